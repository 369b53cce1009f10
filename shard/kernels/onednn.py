"""oneDNN's linear on a weight prepacked once into oneDNN's blocked layout, as vLLM's CPU backend
does: `prepack` reorders a weight at load (PyTorch's private `mkldnn._reorder_linear_weight`),
`linear` runs x @ W.T on it (`mkldnn._linear_pointwise`) without the per-call reorder that
F.linear's oneDNN/MKL path pays. `shard.layers.linear` decides which rows take it.

The ops are private, so `available()` checks once per dtype, at the first prepack, that they
exist and agree with F.linear on a small case; where not, the plain path stays and the reason is
logged once. PyTorch's CPU build takes float32 everywhere, bfloat16 only on CPUs with AVX-NE-CONVERT
or AVX-512 BW/VL/DQ (on this AVX2-only EPYC: "bf16 path needs the cpu support avx_ne_convert or
avx512bw, avx512vl and avx512dq").

`CARAVAN_ONEDNN_LINEAR` (`ENV`) chooses, as `CARAVAN_CPU_KERNELS` does for the C kernels (see
`enabled`). `auto` prepacks a weight only where the copy replaces it, no memory added. Where no
other path reads the plain weight (no C kernels: bf16, CARAVAN_CPU_KERNELS=off, a CPU they cannot
run on), it always does: on the AVX2 EPYC oneDNN measured 1.0x to 1.5x faster than MKL and addmm
at 1 to 256 rows, level at 512 (`bench/cpu_linear.py`). Where the C kernels read it (float32 on
x86-64 with AVX2, the default there), the fused decode kernels and oneDNN are timed against each
other at load (`shard.cpu_path`) and the weight is packed in place only where oneDNN wins; on the
EPYC it loses (1.4-1.6x the kernels' time a decode step). `on` prepacks beside the plain weight
there, doubling the linears' memory: oneDNN then takes the steps above the kernels' 128 rows.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# The batch size oneDNN chooses the blocked layout for; one layout serves every batch. Hints of 32,
# 128 and 512 measured alike (within 5%) on SmolLM2's gate|up weight at 16 to 256 rows; 1 was 1.7x
# slower at 16 rows.
BATCH_HINT = 128
DTYPES = (torch.float32, torch.bfloat16)
ENV = "CARAVAN_ONEDNN_LINEAR"

_lock = threading.Lock()
_checked: dict[torch.dtype, str] = {}   # dtype -> "" where the ops work, else why not


def _ops():
    return torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise


def _check(dtype: torch.dtype) -> str:
    """Why prepacked linears of `dtype` cannot be used here ("" where they can)."""
    if dtype not in DTYPES:
        return f"{dtype} is not one of {', '.join(map(str, DTYPES))}"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    try:
        reorder, pointwise = _ops()
        gen = torch.Generator().manual_seed(0)
        w, x = torch.randn(48, 40, generator=gen).to(dtype), torch.randn(5, 40, generator=gen).to(dtype)
        got = pointwise(x, reorder(w, BATCH_HINT), None, "none", [], "")
    except (AttributeError, RuntimeError) as e:  # an op missing from torch.ops, or refused on this CPU
        return f"torch.ops.mkldnn's prepacked linear fails in torch {torch.__version__}: {e}"
    want = F.linear(x.float(), w.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=tol, atol=tol):
        return f"torch.ops.mkldnn's prepacked linear disagrees with F.linear in torch {torch.__version__}"
    return ""


def why_unavailable(dtype: torch.dtype = torch.float32) -> str:
    """Why weights of `dtype` are not prepacked on this machine ("" where they can be); logs the
    reason once per dtype."""
    if dtype not in _checked:
        with _lock:
            if dtype not in _checked:
                _checked[dtype] = why = _check(dtype)
                if why:
                    log.warning("prepacked oneDNN linears unavailable for %s (%s); CPU linears keep their "
                                "plain weights and PyTorch's GEMM", dtype, why)
    return _checked[dtype]


def available(dtype: torch.dtype = torch.float32) -> bool:
    return not why_unavailable(dtype)


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "on", "off"):
        raise ValueError(f"{ENV}={value!r}: use auto (default), on or off")
    return value


def enabled(dtype: torch.dtype, *, beside: bool) -> bool:
    """Whether a CPU weight of `dtype` is prepacked: `beside` its plain copy (which other paths still
    read, doubling its memory) or in its place. `ENV`: `on` prepacks both ways (an error where the
    ops do not work for `dtype`), `off` neither, `auto` (default) only in place (the caller asks for
    in place where `shard.cpu_path` measured oneDNN faster, or where nothing else reads the weight).
    Never FP8 or fp16."""
    choice = mode()
    if choice == "off" or dtype not in DTYPES or (choice == "auto" and beside):
        return False
    if choice == "on" and (why := why_unavailable(dtype)):
        raise RuntimeError(f"{ENV}=on but {why}; set {ENV}=auto or off")
    return available(dtype)


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] on CPU -> an opaque oneDNN tensor for `linear` (same bytes, blocked)."""
    assert weight.device.type == "cpu" and available(weight.dtype)
    return _ops()[0](weight.detach(), BATCH_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ W.T for W prepacked by `prepack`."""
    return _ops()[1](x, packed, None, "none", [], "")


def is_packed(weight: torch.Tensor) -> bool:
    return weight.layout == torch._mkldnn
