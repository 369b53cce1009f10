"""The GPUs `caravan plan` knows: the few numbers a layout's memory and speed floors need.

Peak numbers from NVIDIA's datasheets; sustained rates are lower (see shard/planner.py on what the
estimates leave out). Memory is what CUDA reports as the device's total (`cudaMemGetInfo`, the
`nvidia-smi` "Total"), which is what a serving process can count on, not the marketing "80 GB".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    bf16_flops: float              # dense tensor-core peak, no 2:4 sparsity
    fp8_flops: float | None        # None: no FP8 tensor cores; FP8 weights are upcast and run at the BF16 rate
    nvlink_bytes_per_s: float      # one direction, per GPU: what one rank of a ring all-reduce sends at
    internode_bytes_per_s: float   # one GPU's share of the node's network: the NIC a PP hand-off leaves by


MiB = 2**20

GPUS = {g.name: g for g in (
    # H100 SXM5 80GB, "NVIDIA H100 Tensor Core GPU" datasheet: 3.35 TB/s HBM3; BF16 1,979 and FP8 3,958
    # TFLOPS "with sparsity", half that dense; NVLink 900 GB/s (both directions together). Memory: 81,559 MiB
    # as nvidia-smi reports it. Network: a DGX/HGX H100 has one 400 Gb/s ConnectX-7 (NDR InfiniBand) per GPU.
    GPU("h100-80gb", 81_559 * MiB, 3.35e12, 989.4e12, 1978.9e12, 450e9, 50e9),
    # H200 SXM 141GB, "NVIDIA H200 Tensor Core GPU" datasheet: 4.8 TB/s HBM3e; the same Hopper tensor cores
    # and NVLink as the H100 SXM. Memory: 143,771 MiB as nvidia-smi reports it. Network as the HGX H100.
    GPU("h200", 143_771 * MiB, 4.8e12, 989.4e12, 1978.9e12, 450e9, 50e9),
    # A100 SXM4 80GB, "NVIDIA A100 Tensor Core GPU" datasheet: 2,039 GB/s HBM2e; BF16 312 TFLOPS dense; no
    # FP8; NVLink 600 GB/s (both directions). Memory: 81,920 MiB. Network: a DGX A100 has one 200 Gb/s
    # ConnectX-6 (HDR InfiniBand) per GPU.
    GPU("a100-80gb", 81_920 * MiB, 2.039e12, 312e12, None, 300e9, 25e9),
)}


def gpu(name: str) -> GPU:
    """The GPU called `name`; KeyError listing the known ones otherwise."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown GPU {name!r}; known: {', '.join(sorted(GPUS))}") from None


# Substrings of `torch.cuda.get_device_name()` -> the GPU above, most specific first.
_DEVICE_NAMES = (("H200", "h200"), ("H100 80GB", "h100-80gb"), ("H100", "h100-80gb"), ("A100-SXM4-80GB", "a100-80gb"),
                 ("A100 80GB", "a100-80gb"))


def gpu_for_device(device_name: str) -> GPU | None:
    """The GPU of this table a CUDA device name ("NVIDIA H200") is, or None: a bench's measurements
    count for `caravan plan` on that GPU only."""
    return next((GPUS[key] for part, key in _DEVICE_NAMES if part in device_name), None)
