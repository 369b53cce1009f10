"""Meta's FP8 checkpoints (`quant_method: fbgemm_fp8`): which tensors are FP8, in one place.

A converted linear stores `weight` as float8_e4m3fn [out, in] and `weight_scale` as float32
[out, 1], one scale per output row: the real weight is `weight.float() * weight_scale`. The
modules listed in `modules_to_not_convert` keep their BF16 weight and have no scale. The loader
(what it reads and checks, what it keeps FP8), the model (which linears it builds FP8) and the
planner (how many bytes a rank holds) all ask this module, so they cannot disagree on what is FP8.

On CUDA, a decoder layer's linear whose checkpoint parts are all FP8 keeps its FP8 weight and row
scales (`resident_linears`) and multiplies with the FP8 GEMMs of `shard.kernels.fp8`. Everything
else FP8 (a fused weight with a BF16 part, an FP8 LM head) and every FP8 weight off CUDA is
dequantised on load (`dequantize`), so it computes exactly as a BF16 model whose weights are the
dequantised ones.
"""

from __future__ import annotations

import re

import torch

from shard.config import ModelConfig, QuantizationConfig
from shard.kernels.fp8 import FP8Gemm
from shard.layers import TensorSlice

FP8_DTYPE = "F8_E4M3"        # safetensors' name for torch.float8_e4m3fn
SCALE_DTYPE = "F32"
SCALE_SUFFIX = "weight_scale"

# The linears of a decoder layer as the model fuses them (`shard.model`): its module -> the checkpoint
# modules whose rows it stacks. Embeddings and norms are not linears and are never converted.
FUSED_LINEARS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "self_attn.o_proj": ("self_attn.o_proj",),
                 "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
                 "mlp.down_proj": ("mlp.down_proj",)}
# The linears the fbgemm_fp8 format can convert, per decoder layer.
LAYER_LINEARS = tuple(m for parts in FUSED_LINEARS.values() for m in parts)
# transformers' default when `modules_to_not_convert` is absent: the output embedding stays BF16.
DEFAULT_NOT_CONVERTED = ("lm_head",)


def meta_fp8_recipe(cfg: ModelConfig) -> tuple[str, ...]:
    """`modules_to_not_convert` of Meta's FP8 Llama 3.1 checkpoints (405B-Instruct-FP8), for any
    depth: Meta quantizes only the MLP projections (w1, w3, w2 = gate, up, down) of the decoder
    layers, skipping the first and the last layer, so attention, the first and last layers and
    the LM head stay BF16. Spelt as transformers' conversion script for that checkpoint spells it."""
    last = cfg.num_layers - 1
    middle = tuple(f"model.layers.{i}.self_attn" for i in range(1, last))
    return ("model.layers.0", f"model.layers.{last}", "lm_head", *middle)


def is_converted(module: str, quant: QuantizationConfig | None) -> bool:
    """Whether linear `module` ("model.layers.3.mlp.down_proj") is FP8 under `quant`. A pattern in
    `modules_to_not_convert` skips a module as transformers matches it: from the start of the name
    up to a module boundary ("model.layers.1" skips "model.layers.1.mlp.up_proj", not
    "model.layers.11..."), as a regular expression with the same boundary, or as a suffix."""
    if quant is None:
        return False
    skip = DEFAULT_NOT_CONVERTED if quant.modules_to_not_convert is None else quant.modules_to_not_convert
    return not any(_skips(pattern, module) for pattern in skip)


def _skips(pattern: str, module: str) -> bool:
    if module.endswith(pattern):
        return True
    try:
        return re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module) is not None
    except re.error:
        return module == pattern or module.startswith(pattern + ".")


def fp8_weight_names(cfg: ModelConfig) -> frozenset[str]:
    """Checkpoint tensors ("model.layers.3.mlp.down_proj.weight") stored FP8 with a `weight_scale`
    under `cfg.quantization`; empty for an unquantized checkpoint."""
    if cfg.quantization is None:
        return frozenset()
    modules = [f"model.layers.{i}.{linear}" for i in range(cfg.num_layers) for linear in LAYER_LINEARS]
    if not cfg.tie_word_embeddings:
        modules.append("lm_head")  # a tied head is the embedding table, never converted
    return frozenset(f"{m}.weight" for m in modules if is_converted(m, cfg.quantization))


def resident_linears(cfg: ModelConfig, layer: int) -> dict[str, FP8Gemm]:
    """The fused linears of decoder layer `layer` that keep FP8 weights on a GPU, by their module in
    the layer ("mlp.gate_up_proj"), with how they multiply: those whose every checkpoint part is FP8.
    One tensor holds one dtype, so a fused weight with a BF16 part is dequantised whole; the LM head
    (a vocab-parallel table, FP8 only when `modules_to_not_convert` omits it) is dequantised too."""
    q = cfg.quantization
    if q is None:
        return {}
    gemm = FP8Gemm(q.activation_scale_ub, q.scaled_mm_min_rows)
    return {fused: gemm for fused, parts in FUSED_LINEARS.items()
            if all(is_converted(f"model.layers.{layer}.{p}", q) for p in parts)}


def keeps_fp8(device: torch.device | str | None) -> bool:
    """Whether a model built on `device` keeps its `resident_linears` FP8: on CUDA, where the FP8 GEMMs
    run; elsewhere (CPU, and the meta device) FP8 weights are dequantised on load."""
    return device is not None and torch.device(device).type == "cuda"


def resident_weight_names(cfg: ModelConfig) -> frozenset[str]:
    """Checkpoint weights that stay FP8 on a GPU (`resident_linears`); a subset of `fp8_weight_names`."""
    return frozenset(f"model.layers.{i}.{part}.weight" for i in range(cfg.num_layers)
                     for fused in resident_linears(cfg, i) for part in FUSED_LINEARS[fused])


def scale_name(weight_name: str) -> str:
    """"x.weight" -> "x.weight_scale"."""
    assert weight_name.endswith(".weight"), weight_name
    return weight_name[: -len("weight")] + SCALE_SUFFIX


def scale_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The `weight_scale` tensors an FP8 checkpoint of `cfg` holds, with their shapes [out, 1];
    `shapes` is the checkpoint's weights (`shard.model.checkpoint_shapes`)."""
    return {scale_name(w): (shapes[w][0], 1) for w in sorted(fp8_weight_names(cfg))}


def scale_slice(s: TensorSlice) -> TensorSlice:
    """The rows of the scale that go with slice `s` of an FP8 weight: the same rows when the
    weight is split by output rows (column-parallel, vocab-parallel), all of them when it is split
    by input columns (row-parallel: every rank holds every output row, each a partial sum)."""
    rows = s.shape[0]
    if s.dim == 0:
        return TensorSlice(scale_name(s.name), (rows, 1), 0, s.start, s.length, s.dst_offset)
    return TensorSlice(scale_name(s.name), (rows, 1), 0, 0, rows)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 rows [n, k] times their float32 scales [n, 1], in float32, then rounded once to `dtype`."""
    return (weight.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def slice_bytes(s: TensorSlice, fp8: frozenset[str], dtype: torch.dtype, *, fp8_resident: bool = True) -> int:
    """Device bytes of one rank's slice `s` of a checkpoint tensor. A weight kept FP8 on the device
    (`s.name` in `fp8`, from `resident_weight_names`) counts 1 byte per element plus its float32
    scale rows (`scale_slice`: all rows for a row-parallel split); with `fp8_resident=False`
    (dequantised on load, as off CUDA) it counts as `dtype`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if s.name not in fp8 or not fp8_resident:
        return s.numel * itemsize
    return s.numel + scale_slice(s).numel * 4
