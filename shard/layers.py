"""Tensor-parallel building blocks. Each layer allocates only its own shard and knows which slice
of which checkpoint tensor fills it (`checkpoint_slices`), so a checkpoint never depends on the
TP degree and a planner can list what a rank reads without reading anything.

Layers do local math only; the model calls the collectives (all-reduce after the row-parallel
projections and the embedding, all-gather after the LM head) where a reader can see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shard import kernels
from shard.kernels import cpu as cpu_kernels
from shard.kernels import fp8 as fp8_gemm
from shard.kernels import onednn
from shard.config import RopeScaling


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           fp8: fp8_gemm.FP8Gemm | None = None, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T; with `fp8`, weight is FP8 and its real value `weight * scale` (float32 [out, 1]),
    multiplied by the FP8 GEMM `fp8` chooses for x's rows (`shard.kernels.fp8`). On CPU, by rows, the
    fastest path `bench/cpu_linear.py` measured (all of SmolLM2-135M's linears, 2 threads, an AMD
    EPYC with AVX2 and no AVX-512, quiet machine):

    - up to 128 rows in float32 on a plain weight, the hand-written kernel of `shard.kernels.cpu`
      (it streams the weight at near the memory bandwidth, where MKL reaches about half): 1.1x to
      1.6x faster than oneDNN on a prepacked weight at 1 to 32 rows, level at 64 and 128 (1.02x,
      0.94x). A weight prepacked in place (where `shard.cpu_path` measured oneDNN faster on the
      machine) takes oneDNN at every rows;
    - else, with `packed` (the weight prepacked at load, `prepack`): oneDNN, 1.0x to 1.5x faster
      than the better of MKL and addmm at every rows up to 256 (1.48x at 1, 1.01x at 4, 1.13x to
      1.29x at 8 to 256), level with addmm at 512 (0.98x);
    - else, up to 256 rows, MKL's GEMM as (weight @ x.T).T, up to 2x faster than addmm at 16 rows.

    GPUs and long prefills without a packed weight take the plain path."""
    if fp8 is not None:
        return fp8_gemm.linear(x, weight, scale, fp8)
    if x.device.type == "cpu":
        rows = x.shape[0]
        if (rows <= cpu_kernels.MAX_ROWS and weight.dtype == torch.float32 and not onednn.is_packed(weight)
                and (lib := cpu_kernels.for_tensor(x))):
            return cpu_kernels.linear(x, weight, lib)
        if packed is not None:
            return onednn.linear(x, packed)
        if 1 < rows <= 256:
            return (weight @ x.T).T.contiguous()
    return F.linear(x, weight)


def prepack(layer: nn.Module, *, keep_plain: bool) -> int:
    """Gives `layer` (a linear, or the LM head) oneDNN's copy of its weight in `layer.packed`, where
    `onednn.enabled` says so for the weight on CPU; returns the bytes the copy adds.
    `keep_plain`: whether some path still reads the plain weight (the decode kernels at up to 128
    rows in float32; the embedding, for a tied LM head); then the copy sits beside it, doubling the
    weight's memory. Otherwise it replaces it: `layer.weight` becomes the packed tensor, so that
    weights can no longer be loaded into it (a shard that reloads builds its model anew)."""
    w = layer.weight
    if w.device.type != "cpu" or not onednn.enabled(w.dtype, beside=keep_plain):
        layer.packed = None
        return 0
    layer.packed = onednn.prepack(w)
    if keep_plain:
        return w.numel() * w.element_size()
    layer.weight = nn.Parameter(layer.packed, requires_grad=False)
    return 0


@dataclass(frozen=True)
class TensorSlice:
    """Rows or columns [start, start + length) of checkpoint tensor `name` (full shape `shape`)
    along `dim`, copied to offset `dst_offset` of the parameter along the same dim."""

    name: str
    shape: tuple[int, ...]
    dim: int
    start: int
    length: int
    dst_offset: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape) // self.shape[self.dim] * self.length


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor inside a (possibly fused) column-parallel weight: the tensor has
    `rows` output rows; this rank reads `length` of them from `start`."""

    rows: int
    start: int
    length: int


def split(total: int, tp_size: int, tp_rank: int) -> Part:
    """Even split of `total` rows over TP ranks."""
    size = total // tp_size
    return Part(total, tp_rank * size, size)


class ColumnParallelLinear(nn.Module):
    """y = x W^T, W split by output rows. Several checkpoint tensors may be fused into one
    weight (q|k|v, gate|up): one GEMM instead of three. With `fp8`, the weight is kept FP8 with
    its float32 row scales in `weight_scale` (see `fp8_weights`)."""

    def __init__(self, in_features: int, parts: Sequence[Part], *, dtype: torch.dtype,
                 device: torch.device | str | None = None, fp8: fp8_gemm.FP8Gemm | None = None):
        super().__init__()
        self.in_features = in_features
        self.parts = tuple(parts)
        self.out_sizes = [p.length for p in parts]
        self.fp8 = fp8
        self.weight, self.weight_scale = fp8_weights(sum(self.out_sizes), in_features, dtype, device, fp8)
        self.packed: torch.Tensor | None = None  # oneDNN's copy of `weight` (`prepack`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.weight_scale, self.fp8, self.packed)

    def checkpoint_slices(self, names: Sequence[str]) -> list[TensorSlice]:
        assert len(names) == len(self.parts)
        out, offset = [], 0
        for name, part in zip(names, self.parts):
            out.append(TensorSlice(name, (part.rows, self.in_features), 0, part.start, part.length, offset))
            offset += part.length
        return out


class RowParallelLinear(nn.Module):
    """y = x W^T, W split by input columns; each rank's output is a partial sum that the caller
    all-reduces. With `fp8`, FP8 weights as `ColumnParallelLinear`'s; every rank holds every row's
    scale, since each output row of its partial sum is scaled before the all-reduce."""

    def __init__(self, in_features: int, out_features: int, tp_size: int, tp_rank: int, *,
                 dtype: torch.dtype, device: torch.device | str | None = None, fp8: fp8_gemm.FP8Gemm | None = None):
        super().__init__()
        self.part = split(in_features, tp_size, tp_rank)
        self.out_features = out_features
        self.fp8 = fp8
        self.weight, self.weight_scale = fp8_weights(out_features, self.part.length, dtype, device, fp8)
        self.packed: torch.Tensor | None = None  # oneDNN's copy of `weight` (`prepack`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.weight_scale, self.fp8, self.packed)

    def checkpoint_slices(self, name: str) -> list[TensorSlice]:
        return [TensorSlice(name, (self.out_features, self.part.rows), 1, self.part.start, self.part.length)]


def fp8_weights(rows: int, cols: int, dtype: torch.dtype, device: torch.device | str | None,
                fp8: fp8_gemm.FP8Gemm | None) -> tuple[nn.Parameter, nn.Parameter | None]:
    """A linear's weight [rows, cols]: in `dtype`, or with `fp8` FP8 with its float32 scales [rows, 1]."""
    def param(shape: tuple[int, ...], dt: torch.dtype) -> nn.Parameter:
        return nn.Parameter(torch.empty(shape, dtype=dt, device=device), requires_grad=False)

    if fp8 is None:
        return param((rows, cols), dtype), None
    return param((rows, cols), fp8_gemm.FP8), param((rows, 1), torch.float32)


class VocabParallel(nn.Module):
    """A [vocab, hidden] table split by vocabulary rows: the embedding on the first stage and the
    LM head on the last. Each rank holds ceil(vocab / tp) rows; the last rank's tail past the
    real vocabulary is zero padding that is never read from the checkpoint."""

    def __init__(self, vocab_size: int, hidden_size: int, tp_size: int, tp_rank: int, *,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.vocab_size, self.hidden_size, self.tp_size = vocab_size, hidden_size, tp_size
        self.rows = -(-vocab_size // tp_size)
        self.start = min(tp_rank * self.rows, vocab_size)
        self.length = min(self.rows, vocab_size - self.start)
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.packed: torch.Tensor | None = None  # oneDNN's copy of `weight`, for `logits` (`prepack`)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden]; rows of other ranks' ids are zero (the caller all-reduces)."""
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.length)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return out.masked_fill(outside.unsqueeze(-1), 0.0)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, rows] local logits (the caller gathers and trims the padding)."""
        return linear(h, self.weight, packed=self.packed)

    def checkpoint_slices(self, name: str) -> list[TensorSlice]:
        if self.length == 0:
            return []
        return [TensorSlice(name, (self.vocab_size, self.hidden_size), 0, self.start, self.length)]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, *, dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (lib := kernels.cpu_lib(x)) is not None:
            return cpu_kernels.rms_norm(x, self.weight, self.eps, lib)
        if (tk := kernels.triton_for(x, "add_rms_norm")) is not None and x.is_contiguous():
            return tk.add_rms_norm(x, self.weight, self.eps)[0]
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused kernel
        # Half precision: normalise in fp32, round, then scale, as the reference model rounds.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, its norm): on CUDA one Triton kernel (one read of each input) where switched on."""
        if (tk := kernels.triton_for(x, "add_rms_norm")) is not None and x.is_contiguous() and residual.is_contiguous():
            normed, total = tk.add_rms_norm(x, self.weight, self.eps, residual)
            return total, normed
        total = residual + x
        return total, self(total)

    def checkpoint_slices(self, name: str) -> list[TensorSlice]:
        size = self.weight.shape[0]
        return [TensorSlice(name, (size,), 0, 0, size)]


class RotaryEmbedding(nn.Module):
    """RoPE in the half-split layout of Hugging Face checkpoints, with optional llama3 scaling.
    cos/sin are computed per step from the positions in the batch, so no table of
    max_position_embeddings rows (131k for Llama 3.1) is kept."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None,
                 device: torch.device | str | None = None):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        if scaling is not None:
            inv_freq = _llama3_scale(inv_freq, scaling)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                       # [T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, D]. Returns a new tensor (see `apply_rotary_` to rotate in place)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def apply_rotary_(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first `heads` heads of x [T, any heads, D] in place; returns them, [T, heads, D]."""
    if (lib := kernels.cpu_lib(x)) is not None and x.is_contiguous():
        cpu_kernels.rope_(x, heads, cos.contiguous(), sin.contiguous(), lib)
    else:
        x[:, :heads] = apply_rotary(x[:, :heads], cos, sin)
    return x[:, :heads]


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's long-context scaling: low frequencies are slowed by `factor`, high ones kept,
    the band between interpolated smoothly."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
