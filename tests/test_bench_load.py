"""bench/load.py's pure parts (in load_client.py and load_report.py): timings, percentiles, the
result's shape, and its plots from fake results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import load_client  # noqa: E402
import load_report  # noqa: E402


def test_tpot_is_the_time_per_token_after_the_first():
    assert load_client.tpot(1.0, 2.5, 4) == pytest.approx(0.5)
    assert load_client.tpot(1.0, 1.0, 1) is None and load_client.tpot(None, None, 0) is None
    r = load_client.Request(sent=10.0, first=10.2, done=11.2, tokens=11)
    assert (r.ttft, r.tpot, r.latency) == (pytest.approx(0.2), pytest.approx(0.1), pytest.approx(1.2))


def test_percentiles_interpolate_linearly():
    p = load_client.percentiles([float(v) for v in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["mean"]) == pytest.approx((50.5, 90.1, 99.01, 50.5))
    assert load_client.percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def test_poisson_arrivals_and_prompt_windows_are_deterministic():
    a = load_client.arrivals(2000, rate=4.0, seed=1)
    assert a[0] == 0 and a == sorted(a) and a == load_client.arrivals(2000, rate=4.0, seed=1)
    assert 1 / 4.0 == pytest.approx(a[-1] / (len(a) - 1), rel=0.1)
    prompts = load_client.windows(list(range(10)), n=30, length=4)
    assert len(prompts) == 30 and {len(p) for p in prompts} == {4} and len({tuple(p) for p in prompts}) > 1


def fake_results() -> dict:
    def point(x: float, scale: float) -> dict:
        requests = [load_client.Request(sent=i * 0.1, first=i * 0.1 + scale * (1 + i % 3), done=i * 0.1 + 2 * scale + 1,
                                 tokens=16) for i in range(8)]
        requests.append(load_client.Request(sent=0.0, error="UNAVAILABLE: no replica"))
        return load_client.summarize(x, requests)

    return {"bench": "load", "model": "SmolLM2-135M-Instruct",
            "workload": {"x": "concurrency", "points": [1, 4], "input_tokens": 32, "output_tokens": 16, "requests_per_point": 9},
            "systems": {"caravan": {"points": [point(1, 0.1), point(4, 0.3)]},
                        "transformers": {"points": [point(1, 0.2), point(4, 0.5)]},
                        "vllm": {"batch": {"requests": 8, "output_tokens_per_s": 40.0}},
                        "other": {"skipped": "not installed"}}}


def test_a_point_summarizes_its_requests_and_survives_json():
    p = fake_results()["systems"]["caravan"]["points"][0]
    assert (p["x"], p["requests"], p["ok"], p["errors"], p["output_tokens"]) == (1, 9, 8, 1, 128)
    assert p["first_errors"] == ["UNAVAILABLE: no replica"]
    assert p["duration_s"] == pytest.approx(0.7 + 1.2)  # first send to last token
    assert p["output_tokens_per_s"] == pytest.approx(128 / 1.9) and p["requests_per_s"] == pytest.approx(8 / 1.9)
    assert set(p["ttft_s"]) == {"p50", "p90", "p99", "mean"} and p["ttft_s"]["p50"] == pytest.approx(0.2)
    assert p["tpot_s"]["p50"] == pytest.approx((1.2 - 0.2) / 15, rel=0.5)
    assert len(p["per_request"]) == 9 and p["per_request"][-1]["error"]
    assert json.loads(json.dumps(p)) == p


def test_tables_and_ratios_name_every_system():
    results = fake_results()
    assert "4 | 8/9 |" in load_report.table("caravan", results["systems"]["caravan"]["points"], "concurrency")
    text = load_report.ratios(results, "concurrency")
    assert "transformers | 1 |" in text and "vllm (whole batch of 8)" in text and "other" not in text


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the test and bench extras: pip install -e '.[bench]'")
    paths = load_report.plot(fake_results(), tmp_path / "load-test")
    assert [p.name for p in paths] == ["load-test-sweep.png", "load-test-ttft.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
