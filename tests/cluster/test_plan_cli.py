"""`caravan plan --gpu ...`: ranking a cluster's layouts, as users run it (a subprocess)."""

from __future__ import annotations

import json

import pytest

from tests.cluster.test_cli import LLAMA_405B, assert_user_error, caravan


def test_rank_two_nodes_bf16(tmp_path) -> None:
    # As in the README, from the repo root; the roofline floors (an empty results folder).
    result = caravan("plan", "--model", "../shared/fixtures/llama-3.1-405b-instruct", "--gpu", "h100-80gb",
                     "--nodes", "2", "--gpus-per-node", "8", "--results", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "on 2 x 8 h100-80gb" in lines[0] and "bf16 weights" in lines[0]
    (row,) = [line for line in lines if "TP 8 x PP 2 x 1" in line]
    cells = row.split()
    assert cells[8] == "50.74" and 29 < float(cells[11]) < 32  # weights GB per GPU, decode ms per token
    assert "does not fit: 25.03 GB over per GPU" in result.stdout
    assert "estimates are roofline floors" in result.stdout


def test_rank_with_measured_efficiencies(tmp_path) -> None:
    results, empty = tmp_path / "results", tmp_path / "empty"
    results.mkdir(), empty.mkdir()
    path = results / "fp8_gemm-20260101-000000.json"
    path.write_text(json.dumps({"gpu": "h200", "efficiency": {
        "fp8": {"decode_roofline_fraction": {"1": 0.5, "64": 0.7}, "prefill_gemm_fraction": 0.4}}}))
    args = ("plan", "--model", LLAMA_405B, "--gpu", "h200", "--dtype", "fp8", "--tp", "8", "--json")
    measured = json.loads(caravan(*args, "--results", results).stdout)
    floor = json.loads(caravan(*args, "--results", empty).stdout)
    assert measured["estimate"]["basis"] == "measured" and measured["estimate"]["source"] == str(path)
    assert floor["estimate"]["basis"] == "roofline"
    (m,), (f,) = measured["layouts"], floor["layouts"]
    assert 1.9 < m["decode_s_per_token"] / f["decode_s_per_token"] < 2.0    # reads at half the rate; reduces not
    assert m["output_tokens_per_s"] < f["output_tokens_per_s"]
    text = caravan(*args[:-1], "--results", results).stdout
    assert f"measured on h200, {path} (fp8): decode at batch 1: 50%, batch 64: 70% of the HBM roofline" in text


def test_rank_one_node_bf16_does_not_fit() -> None:
    result = caravan("plan", "--model", LLAMA_405B, "--gpu", "h100-80gb", "--nodes", "1", "--gpus-per-node", "8")
    assert result.returncode == 1, result.stderr
    assert "no layout fits: the nearest, TP 8 x PP 1 x 1, needs 25.03 GB more per GPU" in result.stdout


def test_rank_one_node_fp8_json() -> None:
    result = caravan("plan", "--model", LLAMA_405B / "config.json", "--gpu", "h100-80gb", "--dtype", "fp8",
                     "--tp", "8", "--workload", "1024:128", "--speculate", "4:0.7", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["dtype"] == "fp8" and out["workload"] == {"input_tokens": 1024, "output_tokens": 128, "context": 8192,
                                                         "draft_tokens": 4, "acceptance": 0.7}
    (layout,) = out["layouts"]
    # 2.77 tokens a verify step that costs a little more than a decode step
    assert layout["decode_s_per_token"] / 2.77 < layout["speculative_decode_s_per_token"] < layout["decode_s_per_token"] / 2
    assert (layout["tp"], layout["pp"], layout["replicas"], layout["fits"]) == (8, 1, 1, True)
    assert layout["weight_bytes_per_gpu"] / 2**30 == pytest.approx(57.752, rel=0.05)
    assert layout["output_tokens_per_s"] == pytest.approx(128 * layout["requests_per_s"])


@pytest.mark.parametrize("flags, fragments", [
    (["--gpu", "b300"], ["--gpu", "unknown GPU 'b300'", "a100-80gb, h100-80gb, h200"]),
    (["--gpu", "h200", "--nodes", "0"], ["--nodes", "got 0"]),
    (["--gpu", "h200", "--gpus-per-node", "-1"], ["--gpus-per-node", "got -1"]),
    (["--gpu", "h200", "--workload", "1024"], ["--workload", "'1024'", "INPUT:OUTPUT"]),
    (["--gpu", "h200", "--workload", "0:128"], ["--workload", "both >= 1"]),
    (["--gpu", "h200", "--dtype", "float32"], ["--dtype", "use bf16 or fp8"]),
    (["--nodes", "2"], ["--nodes", "needs --gpu"]),
    (["--gpu", "h200", "--results", "/nonexistent"], ["--results", "/nonexistent is not a folder"]),
    (["--results", "bench/results"], ["--results", "needs --gpu"]),
    (["--gpu", "h200", "--speculate", "4"], ["--speculate", "got '4'", "K:RATE"]),
    (["--gpu", "h200", "--speculate", "4:1.5"], ["--speculate", "got '4:1.5'", "0 to 1"]),
    (["--gpu", "h200", "--speculate", "0:0.5"], ["--speculate", "1 to 16"]),
    (["--speculate", "4:0.7"], ["--speculate", "needs --gpu"]),
])
def test_rank_bad_flags(flags: list[str], fragments: list[str]) -> None:
    assert_user_error(caravan("plan", "--model", LLAMA_405B, *flags), "plan", *fragments)
