"""Which path a CPU stage's float32 linears take, measured once per machine when `auto` has a choice.

Two paths each hold one copy of a weight:
- `kernels`: the plain weight, read by the fused decode layer of `shard.kernels.cpu` (two calls a
  layer, up to `MAX_ROWS` decode rows) and, for longer steps, by MKL's GEMM;
- `onednn`: the weight prepacked in place for oneDNN (`shard.kernels.onednn`, as vLLM's CPU backend
  does); a decode step runs the layer's operators with oneDNN's GEMMs.

Which is faster depends on the CPU. On an AMD EPYC with AVX2 the fused kernels win at decode sizes
(`bench/cpu_linear.py`); on a Xeon with AVX-512 or AMX, oneDNN has wider kernels than the AVX2 C
code. So with `CARAVAN_ONEDNN_LINEAR=auto` (the default), at load, a stage times one of its own
decoder layers both ways on decode steps of `ROWS` rows attending to `CONTEXT` tokens (and its LM
head, where untied), and takes oneDNN only where it needs at most `MARGIN` of the kernels' time
(geometric mean over `ROWS`). Ties keep the kernels: numerics do not move for nothing.

The verdict is cached per machine in `$XDG_CACHE_HOME/caravan/kernels/cpu-paths.json`, keyed by
the CPU model, PyTorch, the kernels' build, the thread count and the shapes: every later load, a
repaired shard's included, takes the same path without timing, so a resumed stream is computed the
way it began. Delete the file to measure again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from shard.attention import AttentionMetadata, KVCache
from shard.kernels import cpu as cpu_kernels
from shard.kernels import onednn
from shard.layers import linear

log = logging.getLogger(__name__)

KERNELS, ONEDNN = "kernels", "onednn"
ROWS = (1, 8, 32, 128)   # decode rows per timed step
CONTEXT = 128            # tokens each timed decode attends to
MARGIN = 0.9             # oneDNN is taken where it needs at most this fraction of the kernels' time
ROUNDS = 5               # alternating rounds; the quickest of each way counts
TARGET_S = 0.004         # each timed call repeats to about this long
BLOCK = 16

_lock = threading.Lock()


@dataclass(frozen=True)
class Measured:
    """The verdict for one part of a stage, with the timings behind it (ms per step, by `ROWS`)."""

    path: str
    kernels_ms: tuple[float, ...]
    onednn_ms: tuple[float, ...]

    @property
    def ratio(self) -> float:
        """oneDNN's time over the kernels', geometric mean over the rows measured."""
        logs = [math.log(o / k) for k, o in zip(self.kernels_ms, self.onednn_ms)]
        return math.exp(sum(logs) / len(logs))

    def describe(self) -> str:
        rows = ", ".join(f"{r}: {k:.2f}/{o:.2f}" for r, k, o in zip(ROWS, self.kernels_ms, self.onednn_ms))
        return f"{self.path} (oneDNN takes {self.ratio:.2f}x the kernels' time; ms kernels/oneDNN by rows {rows})"


def decide(kernels_ms: list[float], onednn_ms: list[float]) -> Measured:
    probe = Measured(KERNELS, tuple(kernels_ms), tuple(onednn_ms))
    return probe if probe.ratio > MARGIN else Measured(ONEDNN, probe.kernels_ms, probe.onednn_ms)


def choose(stage: nn.Module) -> dict[str, Measured]:
    """The path of each part of `stage` (a `LlamaStage`) that has a choice: "layers" (its decoder
    layers, alike in shape) and "lm_head" (an untied LM head), from the cache or measured now.
    Empty where nothing is to choose: not float32 on CPU, no C kernels, oneDNN's ops unusable, or
    `CARAVAN_ONEDNN_LINEAR` not auto."""
    if (stage.dtype != torch.float32 or torch.device(stage.ctx.device).type != "cpu" or onednn.mode() != "auto"
            or cpu_kernels.library() is None or not onednn.available(torch.float32)):
        return {}
    out, cached = {}, _read()
    for part, (shapes, measure) in _parts(stage).items():
        key = _key(part, shapes)
        if (found := cached.get(key)) is None:
            found = decide(*measure())
            _write(key, found)
            log.info("CPU path for %s, measured (cached in %s): %s", part, cache_file(), found.describe())
        else:
            log.info("CPU path for %s, as measured before on this machine: %s", part, found.describe())
        out[part] = found
    return out


def measure(stage: nn.Module) -> dict[str, Measured]:
    """`choose`'s measurement, made now and not cached (for `bench/cpu_linear.py --stage`)."""
    return {part: decide(*timed()) for part, (_, timed) in _parts(stage).items()}


def _parts(stage: nn.Module) -> dict[str, tuple[tuple, Callable[[], tuple[list[float], list[float]]]]]:
    """Each part with a choice: the shapes its verdict is keyed by, and how to time it."""
    parts = {}
    if len(stage.layers):
        layer = stage.layers[0]
        a, m = layer.self_attn, layer.mlp
        shapes = tuple(tuple(lin.weight.shape) for lin in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj))
        parts["layers"] = ((shapes, a.local_heads, a.local_kv_heads, a.head_dim),
                           lambda: _time_layer(layer, stage.rotary))
    head = stage.lm_head
    if head is not None and head is not stage.embed_tokens:
        parts["lm_head"] = ((tuple(head.weight.shape),), lambda: _time_linear(head.weight))
    return parts


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caravan" / "kernels" / "cpu-paths.json"


def _key(part: str, shapes: tuple) -> str:
    lib = cpu_kernels.library()
    what = [part, repr(shapes), cpu_kernels.cpu_model(), torch.__version__, str(torch.get_num_threads()),
            getattr(lib, "_name", ""), repr((ROWS, CONTEXT, MARGIN))]
    return hashlib.sha256("\0".join(what).encode()).hexdigest()[:24]


def _read() -> dict[str, Measured]:
    path = cache_file()
    try:
        raw = json.loads(path.read_text())
        return {k: Measured(v["path"], tuple(v["kernels_ms"]), tuple(v["onednn_ms"])) for k, v in raw.items()
                if v.get("path") in (KERNELS, ONEDNN)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("ignoring the unreadable CPU path cache %s (%s); measuring again", path, e)
        return {}


def _write(key: str, measured: Measured) -> None:
    """Adds `key` to the cache file, atomically (ranks deciding at once each leave a whole file), to
    the entries it holds now: another process may have added its own since `choose` read it."""
    path = cache_file()
    with _lock:
        entries = {k: asdict(v) for k, v in _read().items()}
        entries[key] = asdict(measured)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("could not cache the CPU path in %s (%s): later loads will measure again", path, e)


class _Solo:
    """A context without collectives, so that a timed layer does its own work only."""

    @staticmethod
    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def _swapped(layer: nn.Module, packed: dict[nn.Module, torch.Tensor] | None):
    """`layer` without collectives, and with its linears' weights replaced by `packed`, if given."""
    a, m = layer.self_attn, layer.mlp
    saved_ctx = (a.ctx, m.ctx)
    saved = {lin: (lin.weight, lin.packed) for lin in (packed or {})}
    a.ctx = m.ctx = _Solo()
    try:
        for lin, p in (packed or {}).items():
            lin.weight, lin.packed = nn.Parameter(p, requires_grad=False), p
        yield
    finally:
        a.ctx, m.ctx = saved_ctx
        for lin, (weight, p) in saved.items():
            lin.weight, lin.packed = weight, p


def _best(calls: dict[str, Callable[[], object]], way_of=lambda way: contextlib.nullcontext()) -> list[float]:
    """The quickest ms per call of `calls[way]` (inside `way_of(way)`) for each way, alternating rounds."""
    per_call = []
    for way in (KERNELS, ONEDNN):
        with way_of(way):
            start = time.perf_counter()
            calls[way]()  # warm: first calls allocate and pick oneDNN's primitives
            per_call.append(time.perf_counter() - start)
    reps = max(1, min(50, math.ceil(TARGET_S / max(min(per_call), 1e-6))))
    best = [math.inf, math.inf]
    for _ in range(ROUNDS):
        for i, way in enumerate((KERNELS, ONEDNN)):
            with way_of(way):
                start = time.perf_counter()
                for _ in range(reps):
                    calls[way]()
                best[i] = min(best[i], (time.perf_counter() - start) / reps * 1e3)
    return best


@torch.inference_mode()
def _time_layer(layer: nn.Module, rotary: nn.Module) -> tuple[list[float], list[float]]:
    a, m = layer.self_attn, layer.mlp
    lins = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
    packed = {lin: onednn.prepack(lin.weight) for lin in lins}
    per_seq = -(-(CONTEXT + 1) // BLOCK)
    cache = KVCache(1, max(ROWS) * per_seq + 1, BLOCK, a.local_kv_heads, a.head_dim, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    hidden = a.qkv_proj.weight.shape[1]
    kernels_ms, onednn_ms = [], []
    for rows in ROWS:
        tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(rows)]
        meta = AttentionMetadata.build([1] * rows, [CONTEXT] * rows, tables, BLOCK)
        cos, sin = rotary(torch.full((rows,), CONTEXT, dtype=torch.int64), torch.float32)
        h = torch.randn(rows, hidden, generator=gen)

        def step() -> None:
            layer(h, cos, sin, cache.k[0], cache.v[0], meta)

        k_ms, o_ms = _best({KERNELS: step, ONEDNN: step},
                           lambda way: _swapped(layer, packed if way == ONEDNN else None))
        kernels_ms.append(k_ms)
        onednn_ms.append(o_ms)
    return kernels_ms, onednn_ms


@torch.inference_mode()
def _time_linear(weight: torch.Tensor) -> tuple[list[float], list[float]]:
    packed = onednn.prepack(weight)
    gen = torch.Generator().manual_seed(0)
    kernels_ms, onednn_ms = [], []
    for rows in ROWS:
        x = torch.randn(rows, weight.shape[1], generator=gen)
        k_ms, o_ms = _best({KERNELS: lambda: linear(x, weight), ONEDNN: lambda: onednn.linear(x, packed)})
        kernels_ms.append(k_ms)
        onednn_ms.append(o_ms)
    return kernels_ms, onednn_ms
