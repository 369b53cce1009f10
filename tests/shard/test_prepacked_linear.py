"""oneDNN's linear on prepacked weights (`shard.kernels.onednn`): it agrees with F.linear on
SmolLM2's shapes at the rows `shard.layers.linear` gives it, it replaces the plain weight only
where nothing else reads that, a machine without the private ops keeps the plain path and says
why, and a model's greedy output is the same with it on and off."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn.functional as F

from shard.kernels import cpu as cpu_kernels
from shard.kernels import onednn
from shard.layers import ColumnParallelLinear, linear, prepack, split
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.worker import ShardWorker
from tests.shard.side_by_side import greedy_side_by_side
from tests.synthetic import make_llama

needs_onednn = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN: {onednn.why_unavailable()}")
NO_KERNELS = {"lib": None, "why": "off for the test"}   # shard.kernels.cpu's state with CARAVAN_CPU_KERNELS=off


@pytest.fixture
def fresh(monkeypatch):
    """The module as a new process sees it: nothing checked yet."""
    monkeypatch.setattr(onednn, "_checked", {})


def small_linear() -> ColumnParallelLinear:
    layer = ColumnParallelLinear(24, [split(40, 1, 0)], dtype=torch.float32)
    layer.weight.data.normal_()
    return layer


@needs_onednn
@pytest.mark.parametrize("out,features", [(960, 576), (576, 1536), (49152, 576)])  # qkv, down_proj, LM head
@pytest.mark.parametrize("rows", [0, 1, 32, cpu_kernels.MAX_ROWS + 1, 300])
def test_prepacked_matches_f_linear(out, features, rows):
    g = torch.Generator().manual_seed(out + rows)
    w, x = torch.randn(out, features, generator=g), torch.randn(rows, features, generator=g)
    packed = onednn.prepack(w)
    want = F.linear(x, w)
    torch.testing.assert_close(onednn.linear(x, packed), want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(linear(x, w, packed=packed), want, rtol=1e-4, atol=1e-3)


@needs_onednn
def test_auto_packs_in_place_only_and_on_beside_the_plain_weight_too(monkeypatch):
    monkeypatch.setenv(onednn.ENV, "auto")
    beside, in_place = small_linear(), small_linear()
    plain = in_place.weight.detach().clone()
    assert prepack(beside, keep_plain=True) == 0 and beside.packed is None
    assert prepack(in_place, keep_plain=False) == 0 and onednn.is_packed(in_place.weight)
    assert [n for n, _ in in_place.named_parameters()] == ["weight"]  # the copy took the weight's place
    for rows in (1, 5, cpu_kernels.MAX_ROWS + 3):                      # every path reads the packed weight
        x = torch.randn(rows, 24)
        torch.testing.assert_close(in_place(x), F.linear(x, plain), rtol=1e-4, atol=1e-4)
    monkeypatch.setenv(onednn.ENV, "on")
    assert prepack(beside, keep_plain=True) == 40 * 24 * 4 and onednn.is_packed(beside.packed)
    assert not onednn.is_packed(beside.weight) and [n for n, _ in beside.named_parameters()] == ["weight"]
    x = torch.randn(cpu_kernels.MAX_ROWS + 3, 24)
    torch.testing.assert_close(beside(x), F.linear(x, beside.weight), rtol=1e-4, atol=1e-4)
    monkeypatch.setenv(onednn.ENV, "off")
    assert prepack(small_linear(), keep_plain=False) == 0
    monkeypatch.setenv(onednn.ENV, "sometimes")
    with pytest.raises(ValueError, match=f"{onednn.ENV}='sometimes'"):
        prepack(small_linear(), keep_plain=False)


def missing_op():
    raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_reorder_linear_weight'")


@pytest.mark.parametrize("broken,why", [
    (missing_op, "fails in torch .*no attribute '_reorder_linear_weight'"),
    (lambda: (lambda w, hint: w, lambda x, w, *rest: x @ w.T + 1), "disagrees with F.linear"),
])
def test_without_working_ops_auto_keeps_the_plain_path_and_says_why_once(fresh, monkeypatch, caplog, broken, why):
    monkeypatch.setattr(onednn, "_ops", broken)
    monkeypatch.setenv(onednn.ENV, "auto")
    layer = small_linear()
    with caplog.at_level(logging.WARNING, logger=onednn.__name__):
        assert prepack(layer, keep_plain=False) == 0 and prepack(small_linear(), keep_plain=False) == 0
    assert layer.packed is None and not onednn.is_packed(layer.weight)
    warnings = [r.getMessage() for r in caplog.records if r.name == onednn.__name__]
    assert len(warnings) == 1 and "keep their plain weights" in warnings[0], warnings
    assert re.search(why, warnings[0]), warnings[0]
    x = torch.randn(cpu_kernels.MAX_ROWS + 3, 24)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-4, atol=1e-4)
    monkeypatch.setenv(onednn.ENV, "on")
    with pytest.raises(RuntimeError, match=f"{onednn.ENV}=on but .*{why}"):
        prepack(layer, keep_plain=False)


def test_fp8_and_fp16_weights_are_never_packed(monkeypatch):
    monkeypatch.setenv(onednn.ENV, "on")
    assert not onednn.enabled(torch.float8_e4m3fn, beside=False) and not onednn.enabled(torch.float16, beside=False)


@needs_onednn
@pytest.mark.parametrize("choice,kernels", [("on", True), ("auto", False)])
def test_greedy_output_is_the_same_with_prepacked_weights_on_and_off(tmp_path, monkeypatch, choice, kernels):
    # With the CPU kernels, `on` packs beside the plain weights: a prompt longer than the kernel's
    # rows runs its prefill's linears through oneDNN, the decode steps through the kernels. Without
    # them, `auto` packs in place and every linear runs through oneDNN. The reference: plain weights.
    if kernels and cpu_kernels.library() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.why_unavailable()}")
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "_state", NO_KERNELS)
    path = make_llama(tmp_path / "m", layers=2, heads=6, kv_heads=2, head_dim=16, intermediate=72, tie=not kernels)
    workers = []
    for env in (choice, "off"):
        monkeypatch.setenv(onednn.ENV, env)
        workers.append(ShardWorker(path, ParallelContext(Layout()), num_blocks=64, block_size=16, progress=False))
    assert (workers[0].packed_bytes > 0) == kernels and workers[1].packed_bytes == 0
    assert onednn.is_packed(workers[0].model.layers[0].mlp.down_proj.weight) != kernels
    assert not onednn.is_packed(workers[0].model.embed_tokens.weight)  # the tied LM head's table: also the embedding
    calls, real = [], onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda x, packed: calls.append(len(x)) or real(x, packed))
    prompts = [[3 + (7 * i) % 900 for i in range(cpu_kernels.MAX_ROWS + 20)], [5, 6, 7]]
    greedy_side_by_side(workers, prompts, [list(range(0, 16)), list(range(16, 32))], steps=5)
    if kernels:   # the prefill's linears, and nothing else
        assert calls and min(calls) > cpu_kernels.MAX_ROWS
    else:         # the 4 linears of each layer at every step; not the tied LM head, which `auto` keeps plain
        assert len(calls) == 5 * 2 * 4 and min(calls) == 2
