"""Ranking the layouts of a cluster for Llama 3.1 405B, from its config alone (meta device, no weights)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from shard.config import ModelConfig
from shard.gpus import GPUS, gpu
from shard.layout import Layout
from shard.plan import as_fp8
from shard.planner import (FP8_RESIDENT_NOTE, RESERVE, ROOFLINE_NOTE, Cluster, Estimate, MeasurementError, Workload,
                           _network_hops, estimate, format_ranking, layouts, load_measured, rank_layouts,
                           ranking_json)
from tests.conftest import SHARED

FIXTURE = SHARED / "fixtures" / "llama-3.1-405b-instruct"
H100 = gpu("h100-80gb")
GiB = 2**30


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def two_nodes_bf16(cfg: ModelConfig) -> list[Estimate]:
    return rank_layouts(cfg, Cluster(H100, 2, 8), Workload())


@pytest.fixture(scope="module")
def one_node_fp8(cfg: ModelConfig) -> list[Estimate]:
    return rank_layouts(as_fp8(cfg), Cluster(H100, 1, 8), Workload(1024, 128))


def by_layout(estimates: list[Estimate], tp: int, pp: int) -> Estimate:
    (e,) = [e for e in estimates if e.layout == Layout(tp, pp)]
    return e


def test_gpu_table() -> None:
    assert {"h100-80gb", "h200", "a100-80gb"} <= GPUS.keys()
    assert gpu("H100-80GB") is H100
    assert H100.hbm_bytes_per_s == 3.35e12 and H100.fp8_flops == pytest.approx(2 * H100.bf16_flops, rel=1e-3)
    for g in GPUS.values():
        assert g.memory_bytes > 80e9 and g.hbm_bytes_per_s > 1e12 and g.internode_bytes_per_s < g.nvlink_bytes_per_s
    with pytest.raises(KeyError, match="unknown GPU 'b300'; known: a100-80gb, h100-80gb, h200"):
        gpu("b300")


def test_layout_rules(cfg: ModelConfig) -> None:
    found = layouts(cfg, Cluster(H100, 2, 8))
    # TP inside a node (1, 2, 4, 8; never 16), TP x PP dividing the 16 GPUs, every GPU used.
    assert {lay.tp for lay, _ in found} == {1, 2, 4, 8}
    assert all(lay.world_size * r == 16 for lay, r in found)
    assert (Layout(8, 2), 1) in found and (Layout(8, 1), 2) in found and (Layout(1, 16), 1) in found
    assert len(found) == 4 + 3 + 3 + 4 == 14  # PP 1,2,4,8,16 / 1,2,4,8 / 1,2,4 / 1,2 by TP 1 / 2 / 4 / 8
    # 3 nodes: TP 8 x PP 3, the BF16 model on all 24 GPUs.
    assert (Layout(8, 3), 1) in layouts(cfg, Cluster(H100, 3, 8))


def test_405b_bf16_two_nodes(two_nodes_bf16: list[Estimate]) -> None:
    e = by_layout(two_nodes_bf16, 8, 2)
    assert e.fits and e.replicas == 1 and e.gpus == 16
    assert 50.6e9 < e.weight_bytes < 50.8e9  # "50.7 GB per GPU", as `caravan plan --tp 8 --pp 2`
    # Two stages in turn, each reading its 50.7 GB at 3.35 TB/s (plus one 8192-token sequence's KV).
    assert e.decode_s == pytest.approx(2 * 50.74e9 / 3.35e12, rel=0.02)
    assert 0.029 < e.decode_s < 0.032
    usable = H100.memory_bytes * (1 - RESERVE)
    kv_per_token = 2 * 63 * 1 * 128 * 2
    assert e.kv_tokens == pytest.approx((usable - e.weight_bytes) / kv_per_token, rel=1e-3)
    assert e.sequences == e.kv_tokens // 8192 and e.batch == e.kv_tokens // 1152
    fitting = [x for x in two_nodes_bf16 if x.fits]
    assert {x.layout for x in fitting} == {Layout(8, 2), Layout(4, 4), Layout(2, 8), Layout(1, 16)}
    assert two_nodes_bf16[:len(fitting)] == fitting  # fitting first, by throughput
    rates = [x.output_tokens_per_s for x in fitting]
    assert rates == sorted(rates, reverse=True) and rates[-1] > 0


def test_405b_bf16_one_node_does_not_fit(cfg: ModelConfig) -> None:
    ranked = rank_layouts(cfg, Cluster(H100, 1, 8), Workload())
    assert ranked and not any(e.fits for e in ranked)
    nearest = ranked[0]
    assert nearest.layout == Layout(8, 1)  # the tie with TP 4 x PP 2 goes to the faster decode
    # 101.5 GB of weights and one 8192-token sequence's KV against 90% of 85.5 GB.
    over = nearest.weight_bytes + 8192 * 2 * 126 * 1 * 128 * 2 - H100.memory_bytes * (1 - RESERVE)
    assert nearest.over_bytes == pytest.approx(over, abs=1)
    assert 24e9 < nearest.over_bytes < 26e9
    assert nearest.requests_per_s == 0 and nearest.kv_tokens == 0
    text = format_ranking(cfg, Cluster(H100, 1, 8), Workload(), ranked)
    assert "does not fit: 25.03 GB over per GPU" in text
    assert "no layout fits: the nearest, TP 8 x PP 1 x 1, needs 25.03 GB more per GPU" in text
    assert "--dtype fp8" in text and FP8_RESIDENT_NOTE not in text


def test_an_fp8_plan_says_how_fp8_is_held(cfg: ModelConfig, one_node_fp8: list[Estimate]) -> None:
    text = format_ranking(as_fp8(cfg), Cluster(H100, 1, 8), Workload(), one_node_fp8)
    assert text.splitlines()[-2:] == [ROOFLINE_NOTE, FP8_RESIDENT_NOTE] and "shard/kernels/fp8.py" in FP8_RESIDENT_NOTE


def test_405b_fp8_one_node(one_node_fp8: list[Estimate]) -> None:
    e = by_layout(one_node_fp8, 8, 1)
    assert e.fits
    # vLLM loads Meta's 405B FP8 checkpoint at TP 8 in 57.752 GiB per GPU.
    assert e.weight_bytes / GiB == pytest.approx(57.752, rel=0.05)
    assert e.decode_s == pytest.approx(e.weight_bytes / 3.35e12, rel=0.03)
    assert e.batch == e.kv_tokens // 1152 > 100
    assert e.output_tokens_per_s == pytest.approx(128 * e.requests_per_s)
    # The ceiling is about three times what vLLM reports (2.82 requests/s), never below it.
    assert 2.82 < e.requests_per_s < 20


def test_fp8_counts_meta_recipe(cfg: ModelConfig) -> None:
    fp8 = as_fp8(cfg)
    (e,) = rank_layouts(fp8, Cluster(H100, 1, 8), Workload(), only=Layout(8, 1))
    h, inter = cfg.hidden_size, cfg.intermediate_size
    fp8_params = 124 * 3 * h * inter                     # the MLPs of layers 1..124
    scales = 124 * (2 * inter + 8 * h)                   # a float32 per row: gate, up split; down whole on 8 ranks
    norms = 7 * (2 * 126 + 1) * h                        # every rank holds every norm
    total = 2 * (405_853_388_800 + norms - fp8_params) + fp8_params + 4 * scales
    assert e.weight_bytes * 8 == total


def test_replicas_scale_throughput(cfg: ModelConfig, one_node_fp8: list[Estimate]) -> None:
    fp8 = as_fp8(cfg)
    (two,) = rank_layouts(fp8, Cluster(H100, 2, 8), Workload(), only=Layout(8, 1))
    one = by_layout(one_node_fp8, 8, 1)
    assert two.replicas == 2 and two.requests_per_s == pytest.approx(2 * one.requests_per_s)
    assert two.decode_s == one.decode_s


def test_pp_hand_off_crosses_nodes() -> None:
    assert _network_hops(Cluster(H100, 2, 8), Layout(8, 2), 1) == 1
    assert _network_hops(Cluster(H100, 2, 8), Layout(4, 2), 2) == 0
    assert _network_hops(Cluster(H100, 2, 8), Layout(4, 4), 1) == 1
    assert _network_hops(Cluster(H100, 2, 8), Layout(1, 16), 1) == 1
    assert _network_hops(Cluster(H100, 4, 8), Layout(8, 4), 1) == 3


def test_faster_gpu_is_faster(cfg: ModelConfig) -> None:
    w = Workload()
    h100 = estimate(cfg, Cluster(H100, 2, 8), Layout(8, 2), 1, w)
    h200 = estimate(cfg, Cluster(gpu("h200"), 2, 8), Layout(8, 2), 1, w)
    a100 = estimate(cfg, Cluster(gpu("a100-80gb"), 2, 8), Layout(8, 2), 1, w)
    assert h200.decode_s < h100.decode_s < a100.decode_s
    assert h200.kv_tokens > h100.kv_tokens
    assert h200.output_tokens_per_s > h100.output_tokens_per_s > a100.output_tokens_per_s


def test_json(cfg: ModelConfig, two_nodes_bf16: list[Estimate]) -> None:
    out = ranking_json(cfg, Cluster(H100, 2, 8), Workload(), two_nodes_bf16)
    assert out["gpu"] == "h100-80gb" and out["dtype"] == "bf16" and out["ranked_by"] == "output_tokens_per_s"
    first = out["layouts"][0]
    assert first["fits"] and first["gpus"] == 16 and first["output_tokens_per_s"] > 0
    last = out["layouts"][-1]
    assert not last["fits"] and last["over_bytes_per_gpu"] > 0 and last["tp"] * last["pp"] == 1


# --- measured efficiencies (bench/results) --------------------------------------------------------------

H200 = gpu("h200")


def write_results(folder: Path) -> Path:
    """A whole-layer bench on the H200 (BF16), a GEMM bench with both dtypes, and files to skip."""
    folder.mkdir(exist_ok=True)
    (folder / "gpu_layer-20260101-000000.json").write_text(json.dumps(
        {"gpu": "h200", "decode_roofline_fraction": {"1": 0.5, "16": 0.8}, "prefill_gemm_fraction": 0.6}))
    (folder / "fp8_gemm-20260101-000000.json").write_text(json.dumps({"gpu": "h200", "efficiency": {
        "bf16": {"decode_roofline_fraction": {"1": 0.9}, "prefill_gemm_fraction": 0.9},
        "fp8": {"decode_roofline_fraction": {"1": 0.4, "256": 0.7}, "prefill_gemm_fraction": 0.5}}}))
    (folder / "fp8_gemm-20270101-000000.json").write_text(json.dumps(
        {"gpu": None, "smoke": True, "efficiency": None}))                       # a CPU smoke run: skipped
    (folder / "gpu_layer-20260101-000001.json").write_text(json.dumps({"gpu": "h100-80gb", "efficiency": {
        "bf16": {"decode_roofline_fraction": {"1": 0.1}}}}))                       # another GPU
    (folder / "load-20260101.json").write_text("{}")                              # not a GPU bench
    return folder


def test_reads_measurements_for_its_gpu_and_dtype(tmp_path: Path) -> None:
    folder = write_results(tmp_path / "results")
    bf16 = load_measured(folder, H200, "bf16")
    assert bf16.source == str(folder / "gpu_layer-20260101-000000.json")    # the whole layer before GEMMs alone
    assert bf16.decode == {1: 0.5, 16: 0.8} and bf16.prefill == 0.6
    assert [bf16.decode_at(b) for b in (1, 3, 5, 12, 500)] == [0.5, 0.5, 0.8, 0.8, 0.8]
    fp8 = load_measured(folder, H200, "fp8")
    assert fp8.source.endswith("fp8_gemm-20260101-000000.json") and fp8.decode == {1: 0.4, 256: 0.7}
    assert load_measured(folder, H100, "fp8") is None                         # the H100 file has BF16 only
    assert load_measured(folder, gpu("a100-80gb"), "bf16") is None
    assert load_measured(tmp_path / "none", H200, "bf16") is None and load_measured(None, H200, "bf16") is None


def test_measured_estimate_divides_the_floor(cfg: ModelConfig, tmp_path: Path) -> None:
    folder = write_results(tmp_path / "results")
    w, cluster = Workload(), Cluster(H200, 2, 8)
    floor = estimate(cfg, cluster, Layout(8, 2), 1, w)
    measured = load_measured(folder, H200, "bf16")
    est = estimate(cfg, cluster, Layout(8, 2), 1, w, measured)
    # The stages' reads (2 x 50.7 GB at 4.8 TB/s) take 1 / 0.5 as long; the all-reduces and the hand-off
    # are not GEMMs and stay: at a quarter, the reads take twice as long again.
    reads = est.decode_s - floor.decode_s
    assert reads == pytest.approx(2 * 50.74e9 / 4.8e12, rel=0.03)
    quarter = dataclasses.replace(measured, decode={1: 0.25})
    assert estimate(cfg, cluster, Layout(8, 2), 1, w, quarter).decode_s - est.decode_s == pytest.approx(2 * reads)
    assert est.output_tokens_per_s < floor.output_tokens_per_s and est.weight_bytes == floor.weight_bytes
    assert est.measured is measured and floor.measured is None
    with pytest.raises(ValueError, match="measured on h200"):
        estimate(cfg, Cluster(H100, 2, 8), Layout(8, 2), 1, w, measured)

    ranked = rank_layouts(cfg, cluster, w, measured=measured)
    text = format_ranking(cfg, cluster, w, ranked)
    assert (f"measured on h200, {folder / 'gpu_layer-20260101-000000.json'} (bf16): decode at batch 1: 50%, "
            f"batch 16: 80% of the HBM roofline; prefill at 60% of the GEMM peak") in text
    assert ROOFLINE_NOTE not in text
    out = ranking_json(cfg, cluster, w, ranked)["estimate"]
    assert out["basis"] == "measured" and out["gpu"] == "h200" and out["decode_roofline_fraction"] == {"1": 0.5,
                                                                                                        "16": 0.8}
    plain = ranking_json(cfg, cluster, w, rank_layouts(cfg, cluster, w))["estimate"]
    assert plain == {"basis": "roofline", "note": ROOFLINE_NOTE}


@pytest.mark.parametrize("block, field", [
    ({"decode_roofline_fraction": {"1": 1.5}}, "decode_roofline_fraction['1']"),
    ({"decode_roofline_fraction": {"one": 0.5}}, "decode_roofline_fraction['one']"),
    ({"decode_roofline_fraction": []}, "decode_roofline_fraction"),
    ({"decode_roofline_fraction": {"1": 0.5}, "prefill_gemm_fraction": 0}, "prefill_gemm_fraction"),
])
def test_malformed_measurement_is_refused(tmp_path: Path, block: dict, field: str) -> None:
    path = tmp_path / "fp8_gemm-1.json"
    path.write_text(json.dumps({"gpu": "h200", "efficiency": {"bf16": block}}))
    with pytest.raises(MeasurementError) as e:
        load_measured(tmp_path, H200, "bf16")
    assert str(path) in str(e.value) and f"efficiency.bf16.{field}" in str(e.value)


def test_speculation_divides_a_verify_step_by_the_tokens_it_yields(cfg):
    """A verify step of 1 + k rows reads the weights and the sequence's KV once, like a decode step, and
    yields 1 + a + ... + a^k tokens: at acceptance 0 it is no faster than plain decoding, at 1 with
    k = 4 nearly 5x faster (the extra rows' compute and all-reduces are not free)."""
    cluster, lay = Cluster(gpu("h200"), 2, 8), Layout(8, 2)
    plain = estimate(cfg, cluster, lay, 1, Workload())
    assert plain.speculative_decode_s is None
    never = estimate(cfg, cluster, lay, 1, Workload(draft_tokens=4, acceptance=0.0))
    always = estimate(cfg, cluster, lay, 1, Workload(draft_tokens=4, acceptance=1.0))
    typical = estimate(cfg, cluster, lay, 1, Workload(draft_tokens=4, acceptance=0.7))
    assert Workload(draft_tokens=4, acceptance=0.7).tokens_per_verify == pytest.approx(1 + 0.7 + 0.49 + 0.343 + 0.2401)
    assert never.speculative_decode_s >= plain.decode_s
    assert plain.decode_s / 5 < always.speculative_decode_s < plain.decode_s / 4
    assert always.speculative_decode_s < typical.speculative_decode_s < never.speculative_decode_s
    assert (typical.decode_s, typical.output_tokens_per_s) == (plain.decode_s, plain.output_tokens_per_s)
    text = format_ranking(cfg, cluster, Workload(draft_tokens=4, acceptance=0.7), [typical])
    assert "spec ms" in text and f"{typical.speculative_decode_s * 1e3:8.1f}" in text and "2.77 tokens a step" in text
    row = ranking_json(cfg, cluster, Workload(draft_tokens=4, acceptance=0.7), [typical])["layouts"][0]
    assert row["speculative_decode_s_per_token"] == typical.speculative_decode_s
