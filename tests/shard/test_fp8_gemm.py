"""FP8 GEMMs (`shard.kernels.fp8`): the math of both paths and the choice between them, on CPU.

On CPU, `scaled_mm` runs CPU torch's own row-wise `torch._scaled_mm` and `weight_only` the same math
in PyTorch operators; the Triton kernel runs under Triton's interpreter in a child process (the
interpreter is chosen when triton is imported). The CUDA `_scaled_mm` call and the compiled kernel
are not exercised here: they need a GPU (SM89+ for the scaled GEMM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from shard.kernels import fp8
from shard.kernels.fp8 import FP8_MAX, FP8Gemm
from tests.conftest import REPO_ROOT


def quantize_reference(x: torch.Tensor, ub: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 as fbgemm's row quantiser defines it, one row at a time in float64."""
    rows, scales = [], []
    for row in x.double():
        amax = min(max(row.abs().max().item(), 1e-12), ub)
        scale = amax / 448.0
        rows.append((row / scale).clamp(-448, 448).to(torch.float8_e4m3fn))
        scales.append(scale)
    return torch.stack(rows), torch.tensor(scales, dtype=torch.float64).view(-1, 1)


def weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FP8 [n, k], float32 row scales [n, 1], their float32 product): row-wise as Meta's checkpoints."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.01, 2.0, n).view(-1, 1)
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    q = (w / scale).to(fp8.FP8)
    return q, scale, q.float() * scale


def test_quantize_per_token_matches_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 64, generator=gen) * torch.tensor([0.01, 1.0, 30.0, 1.0, 1.0]).view(-1, 1)
    x[3] = 0.0                                  # a zero row: the floor, not a division by zero
    q, scale = fp8.quantize_per_token(x.bfloat16(), ub=1200.0)
    want_q, want_scale = quantize_reference(x.bfloat16().float(), 1200.0)
    assert q.dtype == fp8.FP8 and q.shape == (5, 64) and scale.dtype == torch.float32 and scale.shape == (5, 1)
    assert torch.allclose(scale.double(), want_scale, rtol=1e-6)
    assert torch.equal(q.float(), want_q.float())
    assert (q[3].float() == 0).all()
    # Within FP8's precision: 3 mantissa bits, so half an ulp is 1/16 of the value.
    back = q.float() * scale
    assert torch.allclose(back, x.bfloat16().float(), rtol=1 / 16, atol=float(scale.max()) * 2**-9)


def test_activation_scale_is_capped_at_the_bound() -> None:
    x = torch.ones(2, 32)
    x[0, 0] = 5000.0                            # an outlier token past activation_scale_ub
    q, scale = fp8.quantize_per_token(x, ub=1200.0)
    assert scale[0].item() == pytest.approx(1200.0 / 448)   # capped: 5000 would give 11.2
    assert scale[1].item() == pytest.approx(1.0 / 448)      # uncapped
    assert q[0, 0].float().item() == 448.0                  # the outlier saturates...
    assert q[0, 1].float().item() == pytest.approx(1 / scale[0].item(), rel=1 / 16)  # ...the rest survives
    uncapped, _ = fp8.quantize_per_token(x, ub=1e9)
    assert uncapped[0, 1].float().item() < q[0, 1].float().item()


@pytest.mark.parametrize("rows", [1, 16, 33])
def test_scaled_mm_math(rows: int) -> None:
    w, w_scale, w_real = weights(48, 64)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).bfloat16()
    y = fp8.scaled_mm(x, w, w_scale, ub=1200.0)
    assert y.shape == (rows, 48) and y.dtype == torch.bfloat16
    xq, x_scale = quantize_reference(x.float(), 1200.0)
    # What the scaled GEMM must compute: FP8 products summed exactly, then both row scales.
    want = (xq.double() @ w.double().t()) * x_scale * w_scale.double().view(1, -1)
    assert torch.allclose(y.double(), want, rtol=2**-7, atol=1e-2 * want.abs().max().item() * 2**-7)
    # And against the unquantised activations: within what FP8 activations allow (relative to the row's size).
    exact = x.double() @ w_real.double().t()
    assert (y.double() - exact).abs().max() < 0.08 * exact.abs().max()


def test_weight_only_math() -> None:
    w, w_scale, w_real = weights(40, 96)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(3))
    y = fp8.weight_only(x, w, w_scale)
    assert y.dtype == torch.float32 and y.shape == (3, 40)
    assert torch.allclose(y, x @ w_real.t(), rtol=1e-5, atol=1e-5)   # activations untouched: exact
    yb = fp8.weight_only(x.bfloat16(), w, w_scale)
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), x.bfloat16().float() @ w_real.t(), rtol=2**-7,
                                                         atol=1e-3)


def test_gemm_chosen_by_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    gemm = FP8Gemm(activation_scale_ub=1200.0, scaled_mm_min_rows=64)
    assert [gemm.kernel_for(r, torch.bfloat16) for r in (1, 16, 63, 64, 2048)] == \
        ["weight_only"] * 3 + ["scaled_mm"] * 2
    # torch's row-wise scaled GEMM writes bfloat16 only: FP16 and float32 activations stay weight-only.
    assert gemm.kernel_for(4096, torch.float16) == gemm.kernel_for(4096, torch.float32) == "weight_only"
    assert FP8Gemm(1200.0).scaled_mm_min_rows == fp8.SCALED_MM_MIN_ROWS

    calls = []
    monkeypatch.setattr(fp8, "scaled_mm", lambda x, w, s, ub: calls.append(("scaled_mm", x.shape[0], ub)) or x)
    monkeypatch.setattr(fp8, "weight_only", lambda x, w, s: calls.append(("weight_only", x.shape[0])) or x)
    w, s, _ = weights(32, 32)
    for rows in (1, 63, 64, 300):
        fp8.linear(torch.zeros(rows, 32, dtype=torch.bfloat16), w, s, gemm)
    assert calls == [("weight_only", 1), ("weight_only", 63), ("scaled_mm", 64, 1200.0), ("scaled_mm", 300, 1200.0)]


def test_both_paths_agree_on_a_prefill() -> None:
    # The same layer through either GEMM: they differ only by the activations' FP8 rounding.
    w, w_scale, _ = weights(64, 128, seed=5)
    x = torch.randn(80, 128, generator=torch.Generator().manual_seed(6)).bfloat16()
    a = fp8.linear(x, w, w_scale, FP8Gemm(1200.0, scaled_mm_min_rows=64)).double()
    b = fp8.linear(x, w, w_scale, FP8Gemm(1200.0, scaled_mm_min_rows=10**9)).double()
    assert (a - b).abs().max() < 0.08 * b.abs().max()
    assert not torch.equal(a, b)


# --- the Triton kernel, under Triton's interpreter ----------------------------------------------------

KERNEL_CHECK = textwrap.dedent("""
    import torch
    from shard.kernels import fp8
    gen = torch.Generator().manual_seed(0)
    # Odd sizes: partial tiles in every dimension; 1, 16 and 70 rows take the three tile shapes.
    for m, n, k, dtype in ((1, 40, 70, torch.bfloat16), (16, 96, 300, torch.float16), (17, 130, 64, torch.bfloat16),
                           (70, 200, 96, torch.float16), (0, 32, 32, torch.bfloat16)):
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) * 3).to(torch.float8_e4m3fn)
        s = torch.rand(n, 1, generator=gen) + 0.1
        y = fp8.weight_only_triton(x, w, s)
        want = (x.double() @ w.double().t()) * s.double().view(1, -1)
        assert y.shape == (m, n) and y.dtype == dtype, (y.shape, y.dtype)
        err = (y.double() - want).abs().max().item() if m else 0.0
        bound = want.abs().max().item() * 2.0**-7 if m else 0.0
        assert err <= bound, (m, n, k, dtype, err, bound)
        print(m, n, k, dtype, "max error", err)
    print("ok")
""")


def test_triton_kernel_under_interpreter() -> None:
    try:
        import triton  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("triton is not installed in CI; `pip install triton numpy` (its interpreter runs the FP8 "
                        "kernel on CPU)")
        pytest.skip("triton is not installed: `pip install triton numpy` to run the FP8 kernel under its interpreter")
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", KERNEL_CHECK], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


@pytest.mark.slow
def test_bench_smoke(tmp_path) -> None:
    # bench/fp8_gemm.py end to end on CPU (tiny shapes, the interpreter): its JSON, as a GPU run writes it.
    pytest.importorskip("triton", reason="`pip install triton numpy`: the smoke run uses Triton's interpreter")
    result = subprocess.run([sys.executable, "bench/fp8_gemm.py", "--smoke", "--out", str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300, env=os.environ | {"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = tmp_path.glob("fp8_gemm-*.json")
    out = json.loads(path.read_text())
    assert out["smoke"] and out["gpu"] is None and out["efficiency"] is None   # never read by `caravan plan`
    assert {(t["shape"], t["rows"]) for t in out["timings"]} == {(s, r) for s in ("qkv", "o", "gate_up", "down")
                                                                 for r in (1, 16)}
    assert all(t["weight_only_ratio"] == pytest.approx(t["weight_only_ms"] / t["bf16_ms"]) for t in out["timings"])
    logits = out["logits"]
    assert 0 < logits["weight_only"]["relative"] < logits["scaled_mm"]["relative"] < 0.08
