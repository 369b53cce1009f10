"""Reads one rank's slices of a Hugging Face safetensors checkpoint, strictly.

Strict means: before any tensor data is read, the checkpoint's names are checked against the
model (a missing or unexpected tensor is an error naming it) and the shape of every tensor this
rank reads is checked against the safetensors header; while reading, every row of every
parameter is written exactly once, or loading fails. A rank opens only the files that hold its
tensors and reads only its rows or columns (safetensors slicing), so TP 8 x PP 2 of 405B reads
1/16 of the bytes per rank and a checkpoint never depends on the TP degree.

Meta's FP8 checkpoints (`quantization_config.quant_method: fbgemm_fp8`, see `shard.quant`) load
the same way: a rank reads its slice of each FP8 weight with the matching rows of its scale. A
linear the model built FP8 (on CUDA, `shard.quant.resident_linears`) takes both as they are, the
scale rows into its `weight_scale`; every other FP8 weight is dequantised into the model's dtype.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from shard import quant
from shard.config import ModelConfig
from shard.errors import UserError
from shard.layers import TensorSlice
from shard.model import LlamaStage, checkpoint_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some older checkpoints carry that are recomputed, not loaded.
_RECOMPUTED = (".rotary_emb.inv_freq",)


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not match the model; the message names the tensor and the fix."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    weight_map: dict[str, str]  # tensor name -> file name inside `path`

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """Reads the index, or the header of a single `model.safetensors`; no tensor data."""
        path = Path(path)
        if (path / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{path / INDEX_FILE} is not a safetensors index ({e!r})") from None
            return cls(path, dict(weight_map))
        if (path / SINGLE_FILE).is_file():
            with safe_open(path / SINGLE_FILE, framework="pt") as f:
                return cls(path, {name: SINGLE_FILE for name in f.keys()})
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}: point --model at a Hugging Face "
                              f"checkpoint saved with safetensors (save_pretrained(..., safe_serialization=True))")

    def validate(self, cfg: ModelConfig) -> dict[str, str]:
        """Checks names and shapes of the whole checkpoint against the model, reading only the
        safetensors headers; returns each tensor's dtype. Layout-independent, so a launcher can
        run it once before starting any rank."""
        expected = checkpoint_shapes(cfg)
        scales = quant.scale_shapes(cfg, expected)
        # A scale the config does not expect is judged with its weight, in `_check_fp8`.
        present = {n for n in self.weight_map if not n.endswith(_RECOMPUTED)
                   and not (n.endswith(f".{quant.SCALE_SUFFIX}") and n[: -len("_scale")] in expected)}
        missing, unexpected = sorted(expected.keys() - present), sorted(present - expected.keys())
        if missing:
            raise CheckpointError(f"{self.path} is missing {len(missing)} tensor(s) the model needs, e.g. "
                                  f"{missing[:3]}; is the download complete, and does config.json "
                                  f"(num_hidden_layers={cfg.num_layers}, tie_word_embeddings="
                                  f"{cfg.tie_word_embeddings}) belong to these weights?")
        if unexpected:
            raise CheckpointError(f"{self.path} has {len(unexpected)} tensor(s) a {cfg.num_layers}-layer Llama "
                                  f"does not use, e.g. {unexpected[:3]}; does config.json belong to these weights?")
        dtypes = {}
        for file in sorted(set(self.weight_map.values())):
            path = self.path / file
            if not path.is_file():
                raise CheckpointError(f"{path} is listed in {INDEX_FILE} but missing; finish the download")
            with safe_open(path, framework="pt") as f:
                held = set(f.keys())
                listed = {n for n, fn in self.weight_map.items() if fn == file}
                if listed - held:
                    raise CheckpointError(f"{INDEX_FILE} places {sorted(listed - held)[:3]} in {file}, which "
                                          f"does not hold them; the index and the files are out of step")
                for name in sorted(listed):
                    if name.endswith(_RECOMPUTED):
                        continue
                    sl = f.get_slice(name)
                    shape = tuple(sl.get_shape())
                    want = expected.get(name) or scales.get(name)
                    if want is not None and shape != want:
                        raise CheckpointError(
                            f"{name} in {file} has shape {list(shape)} but config.json implies "
                            f"{list(want)}; the config and the weights disagree")
                    dtypes[name] = sl.get_dtype()
        self._check_fp8(cfg, expected, dtypes)
        return dtypes

    def _check_fp8(self, cfg: ModelConfig, expected: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> None:
        """Each weight is FP8 with a float32 scale exactly where `quantization_config` says so."""
        fp8 = quant.fp8_weight_names(cfg)
        q = cfg.quantization
        why_not = ("config.json has no quantization_config" if q is None else
                   "quantization_config.modules_to_not_convert lists its module" if q.modules_to_not_convert is not None
                   else f"without modules_to_not_convert, {list(quant.DEFAULT_NOT_CONVERTED)} stay unconverted")
        for name in sorted(expected):
            scale, dtype = quant.scale_name(name), dtypes[name]
            if name in fp8:
                if dtype != quant.FP8_DTYPE:
                    raise CheckpointError(
                        f"{name} is {dtype}, but config.json's quantization_config (fbgemm_fp8) makes it FP8 "
                        f"({quant.FP8_DTYPE}): its module is not in modules_to_not_convert. Add "
                        f"{name.removesuffix('.weight')!r} to modules_to_not_convert, or use the weights this "
                        f"config.json came with")
                if scale not in dtypes:
                    raise CheckpointError(
                        f"{self.path} is missing {scale}, the float32 per-row scale of the FP8 weight {name}; "
                        f"is the download complete?")
                if dtypes[scale] != quant.SCALE_DTYPE:
                    raise CheckpointError(f"{scale} is {dtypes[scale]}; an fbgemm_fp8 scale is float32 "
                                          f"({quant.SCALE_DTYPE}), one per output row of {name}")
            elif dtype.startswith("F8_"):
                raise CheckpointError(
                    f"{name} is FP8 ({dtype}) but {why_not}, so Caravan would read it as unscaled; "
                    f"use the config.json that came with these weights")
            elif scale in dtypes:
                raise CheckpointError(f"{self.path} holds {scale} but {name} is not FP8 ({why_not}); "
                                      f"does config.json belong to these weights?")

    def files_for(self, slices: dict[str, list[TensorSlice]]) -> list[str]:
        """The files a rank opens for `slices`, those of FP8 weights' scales included."""
        return sorted({self.weight_map[n] for group in slices.values() for s in group
                       for n in (s.name, quant.scale_name(s.name)) if n in self.weight_map})


@dataclass
class LoadReport:
    files: list[str]
    tensors_read: int
    bytes_read: int


def load_weights(model: LlamaStage, checkpoint: Checkpoint, *, progress: bool = True) -> LoadReport:
    """Fills `model` (one rank's stage) from the checkpoint; see the module docstring."""
    dtypes = checkpoint.validate(model.cfg)
    params = dict(model.named_parameters())
    slices = model.checkpoint_slices()
    # A linear built FP8 has a `weight_scale` beside its weight: the scale rows of its weight's slices.
    slices |= {f"{n}_scale": [quant.scale_slice(s) for s in slices[n]] for n, p in params.items()
               if p.dtype == torch.float8_e4m3fn and n in slices}
    if set(slices) != set(params):
        raise AssertionError(f"parameters without a checkpoint source: {sorted(set(params) ^ set(slices))}")
    fp8 = quant.fp8_weight_names(model.cfg)
    kept = {n for n, p in params.items() if p.dtype == torch.float8_e4m3fn}
    for n in kept:
        if not all(s.name in fp8 for s in slices[n]):
            raise AssertionError(f"{n} is built FP8 but {[s.name for s in slices[n] if s.name not in fp8]} are not")
    scale_of = {s: quant.scale_slice(s) for n, group in slices.items() if n not in kept for s in group if s.name in fp8}
    # Two passes: the scales of the weights to dequantise (a few KB each, possibly in another file
    # than their weight), then the parameters file by file, each such slice dequantised with its
    # rows of the scale; FP8 weights kept FP8 and their scales are parameters like any other.
    passes: tuple[dict[str, list[tuple[str | None, TensorSlice]]], ...] = (defaultdict(list), defaultdict(list))
    for sc in sorted(set(scale_of.values()), key=lambda t: (t.name, t.start)):
        passes[0][checkpoint.weight_map[sc.name]].append((None, sc))
    for pname, group in slices.items():
        for s in group:
            passes[1][checkpoint.weight_map[s.name]].append((pname, s))
    nbytes = sum(s.numel * _DTYPE_BYTES[dtypes[s.name]] for by_file in passes for items in by_file.values()
                 for _, s in items)

    written = {n: torch.zeros(p.shape[_dim(slices[n])], dtype=torch.bool) for n, p in params.items()}
    scale_data: dict[TensorSlice, torch.Tensor] = {}
    bar = tqdm(total=nbytes, unit="B", unit_scale=True, desc=f"loading rank {model.ctx.rank}", disable=not progress)
    count = 0
    with bar:
        for file, items in (fi for by_file in passes for fi in sorted(by_file.items())):
            with safe_open(checkpoint.path / file, framework="pt", device="cpu") as f:
                for pname, s in items:
                    index = (slice(None),) * s.dim + (slice(s.start, s.start + s.length),)
                    data = f.get_slice(s.name)[index]
                    count += 1
                    bar.update(data.numel() * data.element_size())
                    if pname is None:
                        scale_data[s] = data
                        continue
                    rows = written[pname][s.dst_offset:s.dst_offset + s.length]
                    if rows.any():
                        raise AssertionError(f"{pname} rows {s.dst_offset}.. written twice (from {s.name})")
                    rows.fill_(True)
                    param = params[pname]
                    if s in scale_of:
                        data = quant.dequantize(data, scale_data[scale_of[s]], param.dtype)
                    param.data.narrow(s.dim, s.dst_offset, s.length).copy_(data)
    files = sorted({file for by_file in passes for file in by_file})
    for pname, rows in written.items():
        padding = _padding_rows(model, pname)
        if not rows[: len(rows) - padding].all():
            raise AssertionError(f"{pname}: rows {(~rows).nonzero().flatten()[:5].tolist()} never loaded")
    return LoadReport(files, count, nbytes)


def _dim(group: list[TensorSlice]) -> int:
    return group[0].dim if group else 0


def _padding_rows(model: LlamaStage, pname: str) -> int:
    """Vocab-parallel tables end in zero rows past the real vocabulary on the last TP rank."""
    module = model.get_submodule(pname.rsplit(".", 1)[0])
    return getattr(module, "rows", 0) - getattr(module, "length", 0)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
