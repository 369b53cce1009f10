"""The hand-written kernels, one module per backend, and the one place that picks them by device
and dtype:

- `cpu` (`cpu_kernels.c` and its loader): float32 on x86-64 CPUs with AVX2 and FMA; the whole
  decode layer in two calls. `CARAVAN_CPU_KERNELS` (see `shard.kernels.cpu`) turns them off.
- `triton`: CUDA, any float dtype; the small operators around the GEMMs (`TRITON_OPS`).
- `onednn`: CPU linears on weights prepacked once for oneDNN; `shard.layers.linear` chooses it by
  rows, `CARAVAN_ONEDNN_LINEAR` (see `shard.kernels.onednn`) where weights are prepacked, and
  `shard.cpu_path` where both it and `cpu` could serve float32 (timed at load, once per machine).
- Other backends (an FP8 GEMM, say) are modules beside these, chosen here the same way.

Callers ask `cpu_lib(x)` or `triton_for(x, op)` and take the PyTorch path on None. Everything
else runs PyTorch's operators. Which Triton kernels replace PyTorch's on CUDA is a switch
(`use_triton`) so that `bench/gpu_layer.py` can measure both ways: a kernel belongs in
`DEFAULT_TRITON_OPS` only once it measures faster there.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from collections.abc import Iterable
from types import ModuleType

import torch

from shard.kernels import cpu

log = logging.getLogger(__name__)

TRITON_OPS = ("decode_attention", "add_rms_norm", "rope_kv_write", "silu_mul")
# Paged decode attention is on by default: it is what CUDA graphs need (the PyTorch path's gather
# and mask have shapes that follow the longest context, which a captured graph cannot), and it
# reads each cached key once where the PyTorch path copies the context first. The others replace
# PyTorch operators that run correctly without them; they wait for a GPU measurement.
DEFAULT_TRITON_OPS = frozenset({"decode_attention"})
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_triton_ops: frozenset[str] = DEFAULT_TRITON_OPS
_triton: dict[str, object] = {}   # "module": shard.kernels.triton or None; "why": the reason it is None


def cpu_lib(x: torch.Tensor) -> ctypes.CDLL | None:
    """The C kernels, where they apply to `x` (float32 on CPU) and are available."""
    return cpu.for_tensor(x)


def triton_for(x: torch.Tensor, op: str) -> ModuleType | None:
    """`shard.kernels.triton`, where its kernel `op` is switched on and applies to `x` (a CUDA
    tensor of a float dtype), else None."""
    if op not in _triton_ops or x.device.type != "cuda" or x.dtype not in TRITON_DTYPES:
        return None
    return triton_module()


def triton_module() -> ModuleType | None:
    """The Triton kernels, or None (with a warning, once) where triton is not installed."""
    if "module" not in _triton:
        try:
            _triton["module"], _triton["why"] = importlib.import_module("shard.kernels.triton"), ""
        except ImportError as e:
            _triton["module"], _triton["why"] = None, f"triton cannot be imported ({e})"
            log.warning("Triton kernels unavailable: %s; CUDA steps use PyTorch's operators and CUDA graphs are "
                        "refused. `pip install triton` to use them.", _triton["why"])
    return _triton["module"]  # type: ignore[return-value]


def why_triton_unavailable() -> str:
    triton_module()
    return str(_triton.get("why", ""))


def triton_ops() -> frozenset[str]:
    """The Triton kernels switched on (for CUDA tensors)."""
    return _triton_ops


def use_triton(ops: Iterable[str]) -> frozenset[str]:
    """Switches on exactly these Triton kernels (names from `TRITON_OPS`), the others off; returns
    the previous choice, to restore it. Decide before building CUDA graphs: a captured graph keeps
    the kernels it was captured with."""
    global _triton_ops
    chosen = frozenset(ops)
    unknown = sorted(chosen - set(TRITON_OPS))
    if unknown:
        raise ValueError(f"unknown Triton kernel(s) {', '.join(unknown)}; choose from {', '.join(TRITON_OPS)}")
    previous, _triton_ops = _triton_ops, chosen
    return previous
