"""The hand-written CPU kernels against PyTorch's operators on the same inputs (each model-level
test already runs through them; here every shape edge is hit on purpose), and the
CARAVAN_CPU_KERNELS switch: off, on, auto, on a machine that can and one that cannot build them."""

from __future__ import annotations

import logging
import random
import re

import pytest
import torch
import torch.nn.functional as F

from shard.kernels import cpu as cpu_kernels
from shard.attention import AttentionMetadata, paged_attention
from shard.layers import apply_rotary, apply_rotary_, linear
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.sampler import SamplingParams
from shard.worker import SeqChunk, ShardWorker, StepInput
from tests.shard.side_by_side import greedy_side_by_side
from tests.synthetic import make_llama

lib = cpu_kernels.library()
OFF = {"lib": None, "why": "off for the reference"}   # the module's state with PyTorch's operators only
needs_kernels = pytest.mark.skipif(lib is None, reason=f"CPU kernels unavailable: {cpu_kernels.why_unavailable()}")


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """The module as a new process sees it, with its own build cache."""
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


@needs_kernels
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 16])
@pytest.mark.parametrize("features,out", [(576, 960), (13, 7), (64, 49153)])
def test_linear_matches_torch(rows, features, out):
    g = torch.Generator().manual_seed(rows * 1000 + features)
    x, w = torch.randn(rows, features, generator=g), torch.randn(out, features, generator=g)
    got = cpu_kernels.linear(x, w, lib)
    assert got.shape == (rows, out)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_linear_takes_strided_rows_and_routes_by_row_count():
    w = torch.randn(40, 24)
    x = torch.randn(20, 48)[:, ::2]                       # not contiguous
    torch.testing.assert_close(cpu_kernels.linear(x[:3], w, lib), x[:3] @ w.T, rtol=1e-5, atol=1e-5)
    for rows in (1, cpu_kernels.MAX_ROWS, cpu_kernels.MAX_ROWS + 1, 300):  # kernel, kernel, MKL, addmm
        y = torch.randn(rows, 24)
        torch.testing.assert_close(linear(y, w), y @ w.T, rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("rows,dim", [(1, 576), (7, 576), (3, 13)])
def test_rms_norm_matches_torch(rows, dim):
    x, w = torch.randn(rows, dim) * 3, torch.randn(dim)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-5, lib), F.rms_norm(x, (dim,), w, 1e-5),
                               rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("rows,inter", [(1, 1536), (6, 13)])
def test_silu_mul_matches_torch_over_the_whole_range(rows, inter):
    gate_up = torch.randn(rows, 2 * inter) * 30             # deep into both tails of the sigmoid
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up, lib), F.silu(gate) * up, rtol=2e-6, atol=1e-6)


@needs_kernels
def test_rope_rotates_only_the_first_heads_in_place():
    T, heads, rotated, D = 5, 7, 5, 64
    x = torch.randn(T, heads, D)
    angles = torch.rand(T, D // 2) * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected = torch.cat([apply_rotary(x[:, :rotated], cos, sin), x[:, rotated:]], 1)
    got = apply_rotary_(x, rotated, cos, sin)
    assert got.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def decode_case(seed: int, contexts: list[int], heads: int, kv_heads: int, head_dim: int, block: int = 16,
                spread: float = 1.0):
    """A decode step over scattered blocks; q rows strided as in the model (q is a slice of qkv)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tables_needed = [-(-(c + 1) // block) for c in contexts]
    free = list(range(sum(tables_needed) + 3))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in tables_needed]
    k_cache = torch.randn(len(tables_needed) + sum(tables_needed) + 3, block, kv_heads, head_dim, generator=g) * spread
    v_cache = torch.randn(k_cache.shape, generator=g)
    qkv = torch.randn(len(contexts), heads + 2 * kv_heads, head_dim, generator=g) * spread
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    meta = AttentionMetadata.build([1] * len(contexts), contexts, tables, block)
    return q, k, v, k_cache, v_cache, meta


def run_attention(case, scale):
    q, k, v, k_cache, v_cache, meta = case
    return paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, scale)


@needs_kernels
@pytest.mark.parametrize("contexts,heads,kv_heads,head_dim,spread", [
    ([0], 9, 3, 64, 1.0),                     # one key: its own
    ([31, 5, 130, 300], 9, 3, 64, 1.0),       # several chunks of 128 keys, partial blocks
    ([200, 17], 16, 1, 128, 4.0),             # one KV head for 16 query heads, peaked scores
    ([40, 129], 4, 4, 8, 10.0),               # no grouping, tiny heads, very peaked scores
])
def test_paged_decode_attention_matches_the_torch_path(monkeypatch, contexts, heads, kv_heads, head_dim, spread):
    case = decode_case(len(contexts), contexts, heads, kv_heads, head_dim, spread=spread)
    got = run_attention(case, head_dim ** -0.5)
    monkeypatch.setattr(cpu_kernels, "_state", OFF)
    expected = run_attention(case, head_dim ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_a_mixed_step_sends_only_its_decodes_to_the_kernel(monkeypatch):
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, D, block = 6, 2, 32, 4
    query_lens, contexts = [5, 1, 3, 1], [0, 9, 4, 2]
    tables = [[0, 1], [2, 3, 4], [5, 6], [7]]
    meta = AttentionMetadata.build(query_lens, contexts, tables, block)
    T = sum(query_lens)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (heads, kv_heads, kv_heads))
    cache = torch.randn(8, block, kv_heads, D, generator=g), torch.randn(8, block, kv_heads, D, generator=g)
    got = paged_attention(q, k, v, cache[0].clone(), cache[1].clone(), meta, D ** -0.5)
    monkeypatch.setattr(cpu_kernels, "_state", OFF)
    expected = paged_attention(q, k, v, cache[0].clone(), cache[1].clone(), meta, D ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_off_uses_torch_and_a_bad_value_names_the_variable(fresh_state, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    assert cpu_kernels.library() is None and "off" in cpu_kernels.why_unavailable()
    assert not list(fresh_state.rglob("*.so"))            # nothing was built
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.ENV, "fast")
    with pytest.raises(ValueError, match="CARAVAN_CPU_KERNELS='fast': use auto"):
        cpu_kernels.library()


@needs_kernels
def test_auto_builds_once_into_the_cache_and_reuses_the_build(fresh_state, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "auto")
    assert cpu_kernels.library() is not None
    built = list((fresh_state / "caravan" / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1 and not list(built[0].parent.glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_state", {})

    def no_compiling(*args, **kwargs):
        raise AssertionError(f"compiled again: {args}")
    monkeypatch.setattr(cpu_kernels.subprocess, "run", no_compiling)
    assert cpu_kernels.library() is not None
    assert built[0].stat().st_mtime_ns == stamp


@needs_kernels  # on a CPU the kernels do not support, that is the reason given instead
def test_without_a_compiler_auto_warns_and_on_refuses(fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_state / "no-such-cc"))
    monkeypatch.setenv(cpu_kernels.ENV, "auto")
    with caplog.at_level(logging.WARNING, logger="shard.kernels.cpu"):
        assert cpu_kernels.library() is None
    assert "CPU kernels unavailable" in caplog.text and "no-such-cc" in caplog.text
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(linear(x, w), x @ w.T)      # PyTorch's matmul serves meanwhile
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.ENV, "on")
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match="CARAVAN_CPU_KERNELS=on but .*no-such-cc"):
        cpu_kernels.library()
    assert not list(fresh_state.rglob("*.so*"))           # no partial build left behind


@needs_kernels  # on a CPU the kernels do not support, that is the reason given instead
def test_a_compiler_error_is_reported_with_its_output(fresh_state, monkeypatch):
    fake = fresh_state / "cc"
    fake.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv(cpu_kernels.ENV, "on")
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match="failed to build cpu_kernels.c: error: this compiler"):
        cpu_kernels.library()
    assert not list(fresh_state.rglob("*.so*"))


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, cpu_kernels.MAX_ROWS + 1])  # the last takes the operators' path in both
def test_decode_steps_through_the_layer_kernels_match_the_operators(tmp_path, monkeypatch, rows):
    # Prefills run the operators in both workers; the decode steps after them run each half of every
    # layer as one kernel call in the first, PyTorch's operators in the second.
    path = make_llama(tmp_path / "m", layers=2, heads=6, kv_heads=2, head_dim=16, intermediate=72)
    workers = [ShardWorker(path, ParallelContext(Layout()), num_blocks=4 * rows, block_size=4, progress=False)
               for _ in range(2)]
    states = [{"lib": lib, "why": ""}, OFF]
    prompts = [[3 + i] * (2 + i % 5) for i in range(rows)]
    tables = [[4 * i + j for j in range(4)] for i in range(rows)]
    greedy_side_by_side(workers, prompts, tables, steps=6,
                        before=lambda w: monkeypatch.setattr(cpu_kernels, "_state", states[w]))


@needs_kernels  # on a CPU the kernels do not support, that is the reason given instead
def test_an_unwritable_cache_names_the_folder_and_the_fix(fresh_state, monkeypatch):
    (fresh_state / "caravan").write_text("a file where the cache folder should be")
    monkeypatch.setenv(cpu_kernels.ENV, "on")
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match="kernel cache .* is not writable.*XDG_CACHE_HOME"):
        cpu_kernels.library()


def corrupt(meta: AttentionMetadata, what: str) -> str:
    """Breaks one index of a decode step's metadata in place; returns the message fragment it must earn."""
    if what == "token row":
        meta.decode_token_index[1] = 99
        return "decode row 1 reads token row 99, outside the step's 3 rows"
    if what == "table row":
        meta.decode_ids[2] = -1
        return "decode row 2 reads block table row -1, outside the step's 3 tables"
    if what == "key count":
        meta.decode_kv_lens[0] = meta.block_tables.shape[1] * 16 + 1
        return f"decode row 0 attends to {meta.decode_kv_lens[0]} keys; its block table holds 1 to"
    if what == "block id":
        meta.block_tables[1, 0] = 10_000
        return "decode row 1's block table names block 10000, outside the KV cache's"
    meta.slot_mapping[2] = -5
    return "row 2 would write its key and value to slot -5, outside the KV cache's"


@needs_kernels
@pytest.mark.parametrize("what", ["token row", "table row", "key count", "block id", "slot"])
def test_indices_outside_the_steps_tensors_are_refused_by_name(what):
    _, _, _, k_cache, _, meta = decode_case(7, [20, 3, 40], 4, 2, 16)
    expected = corrupt(meta, what)
    with pytest.raises(cpu_kernels.KVIndexError, match=re.escape(expected)):
        cpu_kernels.check_decode_indices(meta.decode_token_index, meta.decode_ids, meta.decode_kv_lens, 3,
                                         meta.block_tables, k_cache, meta.slot_mapping, lib)


@needs_kernels
@pytest.mark.parametrize("step", ["decode", "mixed"])
def test_a_step_naming_a_block_outside_the_cache_is_refused_before_any_layer_writes_it(tmp_path, step):
    # The kernels index raw memory: without the check, this step would write its keys and values past
    # the cache (or into another tensor) and carry on.
    path = make_llama(tmp_path / "m", layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=64)
    worker = ShardWorker(path, ParallelContext(Layout()), num_blocks=8, block_size=16, progress=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    worker.execute(StepInput([SeqChunk(0, [5, 6, 7], 0, [0], greedy, 0)]))
    cache = worker.cache.k.clone(), worker.cache.v.clone()
    seqs = [SeqChunk(0, [9], 3, [8], greedy, 1)]   # block 8 of an 8-block cache
    if step == "mixed":
        seqs.append(SeqChunk(1, list(range(3, 40)), 0, [1, 2, 3], greedy, 0))
    with pytest.raises(cpu_kernels.KVIndexError, match="block 8, outside the KV cache's 8 blocks"):
        worker.execute(StepInput(seqs))
    assert torch.equal(worker.cache.k, cache[0]) and torch.equal(worker.cache.v, cache[1])
