"""Reads one rank's slices of a Hugging Face safetensors checkpoint, strictly.

Strict means: before any tensor data is read, the checkpoint's names are checked against the
model (a missing or unexpected tensor is an error naming it) and the shape of every tensor this
rank reads is checked against the safetensors header; while reading, every row of every
parameter is written exactly once, or loading fails. A rank opens only the files that hold its
tensors and reads only its rows or columns (safetensors slicing), so TP 8 x PP 2 of 405B reads
1/16 of the bytes per rank and a checkpoint never depends on the TP degree.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from shard.config import ModelConfig
from shard.layers import TensorSlice
from shard.model import LlamaStage, checkpoint_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some older checkpoints carry that are recomputed, not loaded.
_RECOMPUTED = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
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
        present = {n for n in self.weight_map if not n.endswith(_RECOMPUTED)}
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
                    if name not in expected:
                        continue
                    sl = f.get_slice(name)
                    shape = tuple(sl.get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(
                            f"{name} in {file} has shape {list(shape)} but config.json implies "
                            f"{list(expected[name])}; the config and the weights disagree")
                    dtypes[name] = sl.get_dtype()
        return dtypes

    def files_for(self, slices: dict[str, list[TensorSlice]]) -> list[str]:
        return sorted({self.weight_map[s.name] for group in slices.values() for s in group})


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
    if set(slices) != set(params):
        raise AssertionError(f"parameters without a checkpoint source: {sorted(set(params) ^ set(slices))}")
    by_file: dict[str, list[tuple[str, TensorSlice]]] = defaultdict(list)
    for pname, group in slices.items():
        for s in group:
            by_file[checkpoint.weight_map[s.name]].append((pname, s))
    nbytes = sum(s.numel * _DTYPE_BYTES[dtypes[s.name]] for items in by_file.values() for _, s in items)

    written = {n: torch.zeros(p.shape[_dim(slices[n])], dtype=torch.bool) for n, p in params.items()}
    bar = tqdm(total=nbytes, unit="B", unit_scale=True, desc=f"loading rank {model.ctx.rank}", disable=not progress)
    count = 0
    with bar:
        for file, items in sorted(by_file.items()):
            with safe_open(checkpoint.path / file, framework="pt", device="cpu") as f:
                for pname, s in items:
                    index = (slice(None),) * s.dim + (slice(s.start, s.start + s.length),)
                    data = f.get_slice(s.name)[index]
                    rows = written[pname][s.dst_offset:s.dst_offset + s.length]
                    if rows.any():
                        raise AssertionError(f"{pname} rows {s.dst_offset}.. written twice (from {s.name})")
                    rows.fill_(True)
                    params[pname].data.narrow(s.dim, s.dst_offset, s.length).copy_(data)
                    count += 1
                    bar.update(data.numel() * data.element_size())
    for pname, rows in written.items():
        padding = _padding_rows(model, pname)
        if not rows[: len(rows) - padding].all():
            raise AssertionError(f"{pname}: rows {(~rows).nonzero().flatten()[:5].tolist()} never loaded")
    return LoadReport(sorted(by_file), count, nbytes)


def _dim(group: list[TensorSlice]) -> int:
    return group[0].dim if group else 0


def _padding_rows(model: LlamaStage, pname: str) -> int:
    """Vocab-parallel tables end in zero rows past the real vocabulary on the last TP rank."""
    module = model.get_submodule(pname.rsplit(".", 1)[0])
    return getattr(module, "rows", 0) - getattr(module, "length", 0)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
