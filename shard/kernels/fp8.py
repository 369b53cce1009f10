"""FP8 GEMMs for weights kept FP8 on the GPU: y = x @ (w * scale)^T, with w float8_e4m3fn [N, K] and
scale float32 [N, 1], one per output row (Meta's fbgemm_fp8 checkpoints, `shard.quant`).

Two GEMMs, chosen by the rows of x (`FP8Gemm.kernel_for`):
- weight-only (`weight_only`), for decode-sized batches: a step of a few sequences reads every weight
  once and does little arithmetic with it, so FP8's gain there is reading half the bytes. The Triton
  kernel below loads FP8 tiles, widens them to the activation dtype in registers, multiplies with
  BF16/FP16 activations and applies the row scales once, in the epilogue. Activations are not
  quantised, so nothing is lost on them.
- scaled FP8 (`scaled_mm`), for prefill-sized batches, where the FP8 tensor cores' rate matters:
  activations quantised per token (row) to FP8 with a dynamic scale, its row maximum capped at the
  checkpoint's `activation_scale_ub`, then `torch._scaled_mm` with both row-wise scales.
Measured on an H200 for the 405B TP-8 layer shapes, the scaled GEMM with per-token quantisation in
plain PyTorch was slower than BF16 at 1 and 16 rows and faster only at 2,048 (issue 12), hence the
default threshold; `bench/fp8_gemm.py` measures all three GEMMs so a measurement can move it.

Off a GPU, `weight_only` and `scaled_mm` compute the same math with PyTorch operators (CPU torch has a
row-wise `_scaled_mm`), so tests check it; the Triton kernel itself runs on CPU only under Triton's
interpreter (TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; `weight_only` on CUDA then says what to install
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max        # 448
SCALE_EPS = 1e-12                     # a row of zeros quantises with this scale, not a division by 0
# Rows from which prefill takes `scaled_mm` (below: `weight_only`). Between the H200 points
# (scaled slower than BF16 up to 256 rows, faster at 2,048); `bench/fp8_gemm.py` finds the crossover.
SCALED_MM_MIN_ROWS = 1024


@dataclass(frozen=True)
class FP8Gemm:
    """How one FP8 linear multiplies: the activation scale's cap and the row threshold."""

    activation_scale_ub: float
    scaled_mm_min_rows: int = SCALED_MM_MIN_ROWS

    def kernel_for(self, rows: int, dtype: torch.dtype) -> str:
        """"scaled_mm" or "weight_only" for `rows` activation rows of `dtype`. torch's row-wise scaled
        GEMM writes bfloat16 only, so other activation dtypes always take the weight-only GEMM."""
        if rows >= self.scaled_mm_min_rows and dtype == torch.bfloat16:
            return "scaled_mm"
        return "weight_only"


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, gemm: FP8Gemm) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] FP8 * scale [N, 1])^T -> [M, N] in x's dtype, by `gemm.kernel_for(M)`."""
    if gemm.kernel_for(x.shape[0], x.dtype) == "scaled_mm":
        return scaled_mm(x, weight, scale, gemm.activation_scale_ub)
    return weight_only(x, weight, scale)


def quantize_per_token(x: torch.Tensor, ub: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 [M, K], float32 scales [M, 1]) with x ~ fp8 * scale: each row's scale is its
    largest |value|, capped at `ub`, over FP8's largest (448). Values past a capped maximum saturate at
    +-448 * scale: the cap keeps one outlier token from flattening its whole row to zeros."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=SCALE_EPS, max=ub)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, ub: float) -> torch.Tensor:
    """Both operands FP8: x quantised per token (`quantize_per_token`), one `torch._scaled_mm` with the
    row scales of x [M, 1] and of the weight [1, N]. On CUDA this needs SM89+ (Ada, Hopper)."""
    xq, x_scale = quantize_per_token(x, ub)
    # weight.t() is [K, N] column-major, the layout _scaled_mm wants for its second operand.
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=x.dtype)


def weight_only(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] in BF16/FP16 (float32 off CUDA) @ widened FP8 weights, row scales applied to the
    float32 sums: the Triton kernel on CUDA, the same math in PyTorch operators elsewhere."""
    if x.device.type == "cuda":
        return weight_only_triton(x, weight, scale)
    return ((x.float() @ weight.float().t()) * scale.view(1, -1)).to(x.dtype)


def weight_only_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The Triton weight-only FP8 GEMM; on CUDA, or on CPU under Triton's interpreter."""
    if triton is None:
        raise RuntimeError("FP8 weights on a GPU multiply with a Triton kernel, and triton is not installed; "
                           "`pip install triton` (CUDA builds of torch ship it)")
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape == (N, K) and weight.dtype == FP8 and scale.shape == (N, 1), (weight.shape, scale.shape)
    x, weight, scale = x.contiguous(), weight.contiguous(), scale.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    block_m, block_n, block_k, warps, stages = _blocks(M)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    # Off CUDA the kernel can only be running under Triton's interpreter, whose tl.dot multiplies
    # bfloat16 operands as their uint16 bit patterns (triton 3.9); there both operands widen to float32.
    widen_f32 = x.device.type != "cuda" or x.dtype == torch.float32
    _weight_only_kernel[grid](x, weight, scale, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, WIDEN_F32=widen_f32,
                              num_warps=warps, num_stages=stages)
    return y


def _blocks(rows: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). tl.dot takes tiles of at least 16 rows, so a decode
    step of 1-16 rows runs one 16-row tile (the padding rows are masked loads: no HBM traffic) with
    narrow, deep weight tiles so that many blocks stream the weight at once; prefill takes square-ish
    tiles. Unmeasured choices: `bench/fp8_gemm.py` times them."""
    if rows <= 16:
        return 16, 64, 256, 4, 4
    if rows <= 64:
        return 64, 64, 128, 4, 4
    return 128, 128, 64, 8, 3


if triton is not None:
    @triton.jit
    def _weight_only_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            WIDEN_F32: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] tile of y = x @ (w * s)^T; x and w contiguous along K."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]     # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]     # [BLOCK_K, BLOCK_N]: w^T's tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
            w = tl.load(w_ptrs, mask=(rn[None, :] < N) & (rk[:, None] < k_left), other=0.0)
            if WIDEN_F32:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
            else:
                acc += tl.dot(x, w.to(x.dtype))                    # FP8 widened in registers
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)            # [BLOCK_N] row scales, once per tile
        y = (acc * s[None, :]).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))
