"""The TP x PP layout of one model replica, checked against the model before any weight is read.

Rank numbering: global rank = pp_rank * tp + tp_rank, so one stage's TP ranks are consecutive
(and land on one node when the launcher fills nodes in rank order).
"""

from __future__ import annotations

from dataclasses import dataclass

from shard.config import ModelConfig
from shard.errors import UserError


class LayoutError(UserError, ValueError):
    """A TP x PP layout that cannot hold the model; the message lists the valid choices."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(pp_rank, tp_rank) of a global rank."""
        return divmod(rank, self.tp)

    def __str__(self) -> str:
        return f"TP {self.tp} x PP {self.pp}"


def valid_tp(cfg: ModelConfig) -> list[int]:
    """Every TP degree that shards this model evenly, up to the number of attention heads."""
    return [t for t in range(1, cfg.num_heads + 1) if _tp_problem(cfg, t) is None]


def _tp_problem(cfg: ModelConfig, tp: int) -> str | None:
    if cfg.num_heads % tp:
        return f"TP={tp} does not divide the {cfg.num_heads} attention heads"
    if tp <= cfg.num_kv_heads and cfg.num_kv_heads % tp:
        return f"TP={tp} does not divide the {cfg.num_kv_heads} KV heads"
    if tp > cfg.num_kv_heads and tp % cfg.num_kv_heads:
        # KV heads are replicated when TP exceeds them; each rank must hold whole copies.
        return f"TP={tp} is above the {cfg.num_kv_heads} KV heads and not a multiple of them"
    if cfg.intermediate_size % tp:
        return f"TP={tp} does not divide intermediate_size={cfg.intermediate_size}"
    return None


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """Raises LayoutError naming the problem and the valid choices."""
    if layout.tp < 1 or layout.pp < 1:
        raise LayoutError(f"TP and PP must be at least 1, got {layout}")
    problem = _tp_problem(cfg, layout.tp)
    if problem:
        raise LayoutError(f"{problem} of {cfg.name}; use TP {_or_list(valid_tp(cfg))}")
    if layout.pp > cfg.num_layers:
        raise LayoutError(f"PP={layout.pp} is more than the {cfg.num_layers} layers of {cfg.name}; "
                          f"use PP between 1 and {cfg.num_layers}")


def stage_layers(num_layers: int, pp: int, pp_rank: int, head_layers: int = 0) -> range:
    """Layers [start, end) owned by one pipeline stage. Uneven splits give the extra layers to the
    first stages (30 layers on PP 4: 8, 8, 7, 7). `head_layers`: the LM head's weight in
    layers; the last stage, which runs it, gets that many layers fewer (never fewer than one)."""
    head = head_layers
    while head > 0 and (num_layers + head) // pp - head < 1:
        head -= 1
    base, extra = divmod(num_layers + head, pp)
    start = pp_rank * base + min(pp_rank, extra)
    end = start + base + (1 if pp_rank < extra else 0)
    return range(start, min(end, num_layers))


def model_stage_layers(cfg: ModelConfig, pp: int, pp_rank: int) -> range:
    """`stage_layers` balanced by decode time. A decode step streams every weight of its stage once,
    and a decoder layer costs a quarter more than its weights alone (attention over the cache, two
    norms, the activation, its residual adds), so the LM head counts as its weight in such layers,
    rounded down: SmolLM2's 49152 x 576 head as 6 of its 3.5M-parameter layers (18 and 12 layers on
    PP 2); Llama 3.1 405B's as none. `python bench/pp_ceiling.py` prints each stage's step time."""
    h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
    return stage_layers(cfg.num_layers, pp, pp_rank, head_layers=int(cfg.vocab_size * h / (1.25 * layer)))


def _or_list(values: list[int]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]
