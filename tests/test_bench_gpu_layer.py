"""bench/gpu_layer.py --smoke: the GPU layer bench as a user runs it (a script from the checkout,
which finds the repo itself), on tiny shapes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_smoke_run_writes_every_measurement(tmp_path):
    out = tmp_path / "layer.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_layer.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and result["copy_bandwidth_Bps"] > 0 and result["gemm_flops_per_s"] > 0
    assert result["shard"]["num_kv_heads"] == 1                  # 405B's 8 KV heads over TP 8
    assert {(r["batch"], r["context"]) for r in result["decode"]} == {(1, 16), (4, 16), (1, 40), (4, 40)}
    assert all(r["ms_per_layer"] > 0 and r["pct_of_roofline"] > 0 for r in result["decode"])
    assert {(r["batch"], r["context"], r["draft_tokens"]) for r in result["verify"]} == {
        (1, 16, 4), (4, 16, 4), (1, 40, 4), (4, 40, 4)}
    assert all(r["ms_per_layer"] > 0 and r["decode_steps"] > 0 for r in result["verify"])
    assert [r["tokens"] for r in result["prefill"]] == [[32], [64], [16] * 4]
    assert all(r["pct_of_gemm_rate"] > 0 for r in result["prefill"])
    assert result["greedy_fp32_vs_transformers"]["match"] is True
    # The block `caravan plan` reads; a smoke run's own file is skipped by the planner, so read it as a GPU's.
    block = result["efficiency"]["bf16"]
    assert set(block["decode_roofline_fraction"]) == {"1", "4"} and 0 < block["prefill_gemm_fraction"] <= 1
    from shard.gpus import GPUS
    from shard.planner import load_measured
    as_gpu = tmp_path / "results"
    as_gpu.mkdir()
    (as_gpu / "gpu_layer-1.json").write_text(json.dumps({**result, "smoke": False, "gpu": "h200"}))
    measured = load_measured(as_gpu, GPUS["h200"], "bf16")
    assert measured is not None and measured.decode == {int(k): v for k, v in block["decode_roofline_fraction"].items()}
