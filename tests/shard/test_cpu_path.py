"""The CPU path measured at load (`shard.cpu_path`): `auto` times a stage's own layer and LM head
both ways once per machine and shape, keeps the verdict for every later load, takes oneDNN only
where it is clearly faster, and either path gives the same tokens as the plain kernels."""

from __future__ import annotations

import json
import logging

import pytest

from shard import cpu_path
from shard.kernels import cpu as cpu_kernels
from shard.kernels import onednn
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.worker import ShardWorker
from tests.shard.side_by_side import greedy_side_by_side
from tests.synthetic import make_llama

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None or not onednn.available(),
                                reason="needs the CPU kernels and oneDNN's prepacked linear: nothing to choose")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache file of the test's own, and `auto`."""
    path = tmp_path / "cache" / "cpu-paths.json"
    monkeypatch.setattr(cpu_path, "cache_file", lambda: path)
    monkeypatch.setenv(onednn.ENV, "auto")
    return path


@pytest.fixture
def model(tmp_path):
    return make_llama(tmp_path / "m", layers=2, heads=6, kv_heads=2, head_dim=16, intermediate=72, tie=False)


def load(path) -> ShardWorker:
    return ShardWorker(path, ParallelContext(Layout()), num_blocks=64, block_size=16, progress=False)


def no_timing(*args):
    raise AssertionError("measured again")


def test_auto_measures_each_part_once_and_later_loads_take_the_same_path(cache, model, monkeypatch):
    first = load(model).model.cpu_paths
    assert set(first) == {"layers", "lm_head"}
    for measured in first.values():
        assert len(measured.kernels_ms) == len(measured.onednn_ms) == len(cpu_path.ROWS)
        assert all(t > 0 for t in measured.kernels_ms + measured.onednn_ms)
        assert measured.path == (cpu_path.ONEDNN if measured.ratio <= cpu_path.MARGIN else cpu_path.KERNELS)
    assert len(json.loads(cache.read_text())) == 2
    monkeypatch.setattr(cpu_path, "_time_layer", no_timing)
    monkeypatch.setattr(cpu_path, "_time_linear", no_timing)
    again = load(model)   # a repaired shard, say: the same path without timing
    assert again.model.cpu_paths == first
    layer = again.model.layers[0]
    assert onednn.is_packed(layer.mlp.down_proj.weight) == (first["layers"].path == cpu_path.ONEDNN)
    assert again.packed_bytes == 0   # either way one copy of each weight


def test_the_verdict_takes_onednn_only_where_clearly_faster():
    rows = len(cpu_path.ROWS)
    assert cpu_path.decide([1.0] * rows, [0.95] * rows).path == cpu_path.KERNELS   # within the margin: a tie
    assert cpu_path.decide([1.0] * rows, [0.8] * rows).path == cpu_path.ONEDNN
    assert cpu_path.decide([1.0] * rows, [2.0] * rows).path == cpu_path.KERNELS
    mixed = cpu_path.decide([1.0, 1.0, 2.0, 4.0], [2.0, 1.0, 1.0, 1.0])   # slower at 1 row, faster above
    assert mixed.ratio == pytest.approx((2.0 * 0.5 * 0.25) ** 0.25) and mixed.path == cpu_path.ONEDNN


def test_a_measured_onednn_verdict_packs_in_place_and_gives_the_plain_kernels_tokens(cache, model, monkeypatch):
    faster = lambda *args: ([1.0] * len(cpu_path.ROWS), [0.5] * len(cpu_path.ROWS))  # noqa: E731
    monkeypatch.setattr(cpu_path, "_time_layer", faster)
    monkeypatch.setattr(cpu_path, "_time_linear", faster)
    packed = load(model)
    monkeypatch.setenv(onednn.ENV, "off")
    plain = load(model)
    assert {p.path for p in packed.model.cpu_paths.values()} == {cpu_path.ONEDNN} and plain.model.cpu_paths == {}
    assert packed.packed_bytes == 0 and onednn.is_packed(packed.model.lm_head.weight)
    assert all(onednn.is_packed(m.weight) for m in packed.model.modules() if hasattr(m, "packed") and m.packed is not None)
    assert not onednn.is_packed(plain.model.layers[0].self_attn.qkv_proj.weight)
    calls, real = [], onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda x, p: calls.append(len(x)) or real(x, p))
    prompts = [[3 + (7 * i) % 900 for i in range(20)], [5, 6, 7]]
    greedy_side_by_side((packed, plain), prompts, [list(range(0, 16)), list(range(16, 32))], steps=5)
    per_step = 2 * 4 + 1   # two layers of four linears, and the LM head, all through oneDNN
    # The four decode steps' two rows took oneDNN, not the fused kernels (and so did the prefill's
    # LM head, on the prompts' last rows).
    assert calls.count(2) == 4 * per_step + 1, calls


def test_measuring_leaves_the_layer_as_it_was(model):
    worker = load(model)
    layer = worker.model.layers[0]
    before = {name: p for name, p in layer.named_parameters()}
    ctx = layer.self_attn.ctx
    kernels_ms, onednn_ms = cpu_path._time_layer(layer, worker.model.rotary)
    assert len(kernels_ms) == len(onednn_ms) == len(cpu_path.ROWS)
    assert dict(layer.named_parameters()) == before and layer.self_attn.ctx is ctx and layer.mlp.ctx is ctx
    assert all(getattr(m, "packed", None) is None for m in layer.modules())


@pytest.mark.parametrize("choice", ["on", "off"])
def test_only_auto_measures(cache, model, monkeypatch, choice):
    monkeypatch.setattr(cpu_path, "_time_layer", no_timing)
    monkeypatch.setattr(cpu_path, "_time_linear", no_timing)
    monkeypatch.setenv(onednn.ENV, choice)
    worker = load(model)
    assert worker.model.cpu_paths == {} and not cache.exists()
    assert (worker.packed_bytes > 0) == (choice == "on")   # `on`: oneDNN's copy beside the kernels' weights


def test_a_tied_lm_head_is_not_measured(cache, tmp_path):
    worker = load(make_llama(tmp_path / "tied", layers=1, heads=4, kv_heads=2, head_dim=16, intermediate=64, tie=True))
    assert set(worker.model.cpu_paths) == {"layers"}   # its plain table is the embedding's too


def test_an_unreadable_cache_is_measured_again_and_replaced(cache, model, caplog):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger=cpu_path.__name__):
        worker = load(model)
    assert any("unreadable CPU path cache" in r.getMessage() and str(cache) in r.getMessage() for r in caplog.records)
    assert len(json.loads(cache.read_text())) == len(worker.model.cpu_paths) == 2


def test_an_unwritable_cache_still_loads_and_says_so(tmp_path, model, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(cpu_path, "cache_file", lambda: blocker / "cpu-paths.json")
    monkeypatch.setenv(onednn.ENV, "auto")
    with caplog.at_level(logging.WARNING, logger=cpu_path.__name__):
        worker = load(model)
    assert set(worker.model.cpu_paths) == {"layers", "lm_head"}
    assert any("could not cache the CPU path" in r.getMessage() for r in caplog.records)
