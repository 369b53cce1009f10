"""The Triton kernels (`shard.kernels.triton`, for CUDA) against the PyTorch path on the same inputs,
run on the CPU through Triton's interpreter in the child process that `test_triton_kernels.py`
starts with TRITON_INTERPRET=1 (triton reads it when it is imported, before any kernel exists).
Every shape edge on purpose: one row, contexts over many blocks and several splits, block tables
out of order, a last block partly filled, GQA 16:1 and 1:1, bf16 and fp32; then whole decoder
layers with every kernel switched in.

The interpreter truncates fp32 to bf16 where a GPU rounds to nearest, so bf16 results may differ
from PyTorch's by a unit in the last place; fp32 results agree to float tolerance."""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from shard import kernels
from shard.attention import AttentionMetadata, paged_attention
from shard.kernels import cpu
from shard.layers import RMSNorm, apply_rotary
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.sampler import SamplingParams
from shard.worker import SeqChunk, ShardWorker, StepInput
from tests.synthetic import make_llama

OFF = {"lib": None, "why": "off: the PyTorch path is the reference"}
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}


assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/shard/test_triton_kernels.py"
# numpy, under the interpreter, warns where exp overflows to inf in silu's far negative tail (the result is exact).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.fixture(scope="module")
def tk():
    from shard.kernels import triton as module
    return module


@pytest.fixture
def torch_path(monkeypatch):
    """PyTorch's operators only (the CPU C kernels off), for the reference."""
    monkeypatch.setattr(cpu, "_state", OFF)


def tol(dtype: torch.dtype) -> dict:
    return FP32_TOL if dtype == torch.float32 else BF16_TOL


def decode_case(seed: int, contexts: list[int], heads: int, kv_heads: int, head_dim: int, block: int,
                dtype: torch.dtype, extra_rows: int = 0):
    """A decode step over blocks handed out in shuffled order; q is a slice of a qkv tensor (rows
    strided as in the model), and `extra_rows` prefill rows come first so decode rows are not 0..D-1."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    query_lens = [extra_rows] * (extra_rows > 0) + [1] * len(contexts)
    context_lens = [0] * (extra_rows > 0) + contexts
    need = [-(-(c + q) // block) for c, q in zip(context_lens, query_lens)]
    free = list(range(sum(need) + 2))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in need]
    k_cache = torch.randn(sum(need) + 2, block, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(k_cache.shape, generator=g).to(dtype)
    qkv = torch.randn(sum(query_lens), heads + 2 * kv_heads, head_dim, generator=g).to(dtype)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block)
    return qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:], k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contexts,heads,kv_heads,head_dim,block", [
    ([0], 16, 1, 16, 16),                  # one row, one key (its own): GQA 16:1
    ([700, 37, 4], 16, 1, 16, 4),          # 176 blocks, two splits, partial last blocks
    ([5, 40], 4, 4, 32, 16),               # GQA 1:1
])
def test_paged_decode_attention_matches_the_torch_path(tk, torch_path, dtype, contexts, heads, kv_heads, head_dim,
                                                       block):
    q, k, v, k_cache, v_cache, meta = decode_case(len(contexts), contexts, heads, kv_heads, head_dim, block, dtype)
    expected = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, head_dim ** -0.5)
    # The cache as the step leaves it (new keys written), then the kernel reads it where it lies.
    paged_attention(q, k, v, k_cache, v_cache, meta, head_dim ** -0.5)
    got = tk.paged_decode_attention(q, meta.decode_token_index, meta.decode_ids, meta.decode_kv_lens,
                                    meta.block_tables, k_cache, v_cache, head_dim ** -0.5, meta.decode_max_kv_len)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, **tol(dtype))


def test_decode_attention_with_a_loose_bound_and_decodes_after_a_prefill(tk, torch_path):
    # A CUDA graph's bound: the table's width, far past every context, so most splits are empty.
    q, k, v, k_cache, v_cache, meta = decode_case(7, [3, 90], 8, 2, 16, 8, torch.float32, extra_rows=5)
    expected = paged_attention(q, k, v, k_cache, v_cache, meta, 0.25)[meta.decode_token_index]
    got = tk.paged_decode_attention(q, meta.decode_token_index, meta.decode_ids, meta.decode_kv_lens,
                                    meta.block_tables, k_cache, v_cache, 0.25, max_kv_len=4096)
    assert tk.num_splits(4096) > 2
    torch.testing.assert_close(got, expected, **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,size", [(1, 40), (3, 1000)])
def test_add_rms_norm_matches_the_layer(tk, torch_path, dtype, rows, size):
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(size, 1e-5, dtype=dtype)
    norm.weight.copy_(torch.rand(size, generator=g) + 0.5)
    x, residual = (torch.randn(rows, size, generator=g).mul(3).to(dtype) for _ in range(2))
    total, normed = norm.add_forward(x, residual)                   # the PyTorch path on CPU
    got_normed, got_total = tk.add_rms_norm(x, norm.weight, norm.eps, residual)
    torch.testing.assert_close(got_total, total, **tol(dtype))
    torch.testing.assert_close(got_normed, normed, **tol(dtype))
    torch.testing.assert_close(tk.add_rms_norm(x, norm.weight, norm.eps)[0], norm(x), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(16, 1), (4, 4)])
def test_rope_and_cache_write_match_the_torch_path(tk, torch_path, dtype, heads, kv_heads):
    T, D, block = 3, 16, 4
    g = torch.Generator().manual_seed(heads)
    qkv = torch.randn(T, heads + 2 * kv_heads, D, generator=g).to(dtype)
    angles = torch.rand(T, D // 2, generator=g) * 100
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    slots = torch.tensor([13, -1, 2])                  # out of order; -1: a padding row, nothing cached
    k_cache = torch.randn(5, block, kv_heads, D, generator=g).to(dtype)
    v_cache = torch.randn(k_cache.shape, generator=g).to(dtype)

    expected = qkv.clone()
    expected[:, :heads + kv_heads] = apply_rotary(expected[:, :heads + kv_heads], cos, sin)
    k_expected, v_expected = k_cache.clone().view(-1, kv_heads, D), v_cache.clone().view(-1, kv_heads, D)
    k_expected[[13, 2]] = expected[[0, 2], heads:heads + kv_heads]
    v_expected[[13, 2]] = expected[[0, 2], heads + kv_heads:]

    tk.rope_kv_write_(qkv, heads, kv_heads, cos, sin, slots, k_cache, v_cache)
    torch.testing.assert_close(qkv, expected, **tol(dtype))
    torch.testing.assert_close(k_cache.view(-1, kv_heads, D), k_expected, **tol(dtype))
    torch.testing.assert_close(v_cache.view(-1, kv_heads, D), v_expected, rtol=0, atol=0)  # a copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 13), (2, 1500)])
def test_silu_mul_matches_torch_over_the_whole_range(tk, dtype, rows, inter):
    gate_up = (torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 30).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0], dtype=dtype)  # deep into both tails
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(tk.silu_mul(gate_up), F.silu(gate) * up, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_layers_with_every_kernel_match_the_operators(tk, torch_path, monkeypatch, tmp_path, dtype):
    # Two workers, one with every Triton kernel switched in (as on CUDA; here they run interpreted on
    # CPU tensors), one on PyTorch's operators: a prefill, a chunked prefill beside decodes, decodes.
    path = make_llama(tmp_path / "m", layers=2, heads=8, kv_heads=2, head_dim=16, intermediate=48)
    workers = [ShardWorker(path, ParallelContext(Layout()), dtype=dtype, num_blocks=32, block_size=4, progress=False)
               for _ in range(2)]
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    interpreted = lambda x, op: tk                                                  # noqa: E731
    steps = [
        lambda t: [SeqChunk(0, [5, 6, 7, 8, 9], 0, [3, 0], greedy, 0), SeqChunk(1, [11, 12, 13], 0, [7, 9], None)],
        lambda t: [SeqChunk(0, [t[0]], 5, [3, 0], greedy, 1), SeqChunk(1, [14, 15, 16], 3, [7, 9], greedy, 0)],
        lambda t: [SeqChunk(0, [t[0]], 6, [3, 0], greedy, 2), SeqChunk(1, [t[1]], 6, [7, 9], greedy, 1)],
        lambda t: [SeqChunk(0, [t[0]], 7, [3, 0, 5], greedy, 3), SeqChunk(1, [t[1]], 7, [7, 9], greedy, 2)],
    ]
    tokens: list[dict[int, int]] = [{}, {}]
    for step in steps:
        logits = []
        for w, worker in enumerate(workers):
            monkeypatch.setattr(kernels, "triton_for", interpreted if w == 0 else lambda x, op: None)
            out = worker.execute(StepInput(step(tokens[w]), return_logits=True))
            tokens[w] = {s: smp.token_id for s, smp in out.samples.items()}
            logits.append(out.logits.float())
        torch.testing.assert_close(logits[0], logits[1], **(FP32_TOL if dtype == torch.float32 else
                                                             {"rtol": 0.1, "atol": 0.1}))
        assert tokens[0] == tokens[1]
