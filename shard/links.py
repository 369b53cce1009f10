"""Link probes: time one replica's TP all-reduces and PP hand-offs over the very process groups that
`shard.parallel` builds for serving, each operation bounded by a deadline.

A link is what the model's step uses: a stage's TP group all-reduces (twice per layer), and stage s
rank t sends its hidden states to stage s+1 rank t (`ParallelContext.send_next`). Blocking
`dist.all_reduce` / `send` / `recv` wait for a lost peer until the group's timeout (a minute or
more); here every operation is issued with `async_op` and waited on with the time left until the
link's deadline, so a lost peer becomes a `LinkError` naming the link and the peer.

Latency comes from a small message and bandwidth from a large one. For the all-reduce, bandwidth is
the bus bandwidth (bytes x 2(n-1)/n per second: what each rank's link carries in a ring), so TP
groups of any size compare with each other and with the hardware's link speed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shard.layout import Layout
from shard.parallel import ParallelContext

LATENCY_ITERS = 20
BANDWIDTH_ITERS = 5


class LinkError(RuntimeError):
    """An operation of a link probe failed or passed the link's deadline: which link, and which
    operation of which rank."""

    def __init__(self, link: str, detail: str):
        super().__init__(f"{link}: {detail}")
        self.link, self.detail = link, detail

    def __reduce__(self):  # the default would call __init__ with the whole message only
        return LinkError, (self.link, self.detail)


@dataclass(frozen=True)
class Link:
    kind: str                 # "tp": all-reduce over one stage's TP group; "pp": send to the next stage
    stage: int                # tp: the stage; pp: the sending stage
    ranks: tuple[int, ...]    # tp: the group, in order; pp: (sender, receiver)
    tp_rank: int | None = None   # pp: the TP rank of both ends

    @property
    def name(self) -> str:
        if self.kind == "tp":
            return f"TP all-reduce stage {self.stage}"
        return f"PP send stage {self.stage}->{self.stage + 1} tp {self.tp_rank}"

    @property
    def peers(self) -> str:
        return ",".join(map(str, self.ranks)) if self.kind == "tp" else f"{self.ranks[0]}->{self.ranks[1]}"


@dataclass(frozen=True)
class Timing:
    """One rank's view of a link: median seconds of one small and one large operation (for a send,
    the one-way time: half a small round trip, and the large send less the small reply)."""

    small_s: float
    large_s: float
    small_bytes: int
    large_bytes: int


def layout_links(layout: Layout) -> list[Link]:
    """Every link the model's step uses: each stage's TP group (none at TP 1, where nothing is
    all-reduced), then each hand-off from a stage's TP rank t to the next stage's TP rank t."""
    tp = [Link("tp", s, tuple(layout.rank(s, t) for t in range(layout.tp))) for s in range(layout.pp)]
    pp = [Link("pp", s, (layout.rank(s, t), layout.rank(s + 1, t)), t) for s in range(layout.pp - 1)
          for t in range(layout.tp)]
    return (tp if layout.tp > 1 else []) + pp


def bandwidth(link: Link, nbytes: int, seconds: float) -> float:
    """Bytes per second a link carried: bus bandwidth for an all-reduce, plain for a send."""
    n = len(link.ranks)
    factor = 2 * (n - 1) / n if link.kind == "tp" else 1.0
    return nbytes * factor / seconds


def probe(ctx: ParallelContext, link: Link, small_bytes: int, large_bytes: int, timeout_s: float) -> Timing:
    """This rank's part of probing `link`; every rank of the link calls it at about the same time.
    Raises `LinkError` once `timeout_s` has passed, whatever the peers do."""
    assert ctx.rank in link.ranks, (ctx.rank, link)
    deadline = time.monotonic() + timeout_s
    run = _all_reduce if link.kind == "tp" else _send_recv
    small, large = _buffer(small_bytes, ctx.device), _buffer(large_bytes, ctx.device)
    ack = _buffer(4, ctx.device)
    # Warm-up, untimed: NCCL builds its communicator and connections on the first operation.
    run(ctx, link, small, ack, deadline)
    run(ctx, link, large, ack, deadline)
    small_s = statistics.median(run(ctx, link, small, ack, deadline) for _ in range(LATENCY_ITERS))
    large_s = statistics.median(run(ctx, link, large, ack, deadline) for _ in range(BANDWIDTH_ITERS))
    if link.kind == "pp":  # a round trip of small messages, and a large message plus a small reply
        small_s /= 2
        large_s = max(large_s - small_s, 1e-9)
    return Timing(small_s, large_s, small_bytes, large_bytes)


def _buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)  # zeros: sums never overflow


def _all_reduce(ctx: ParallelContext, link: Link, x: torch.Tensor, _ack: torch.Tensor, deadline: float) -> float:
    start = time.perf_counter()
    _wait(dist.all_reduce(x, group=ctx.tp_group, async_op=True), ctx, link, f"all-reduce of {_size(x)}", deadline)
    return time.perf_counter() - start


def _send_recv(ctx: ParallelContext, link: Link, x: torch.Tensor, ack: torch.Tensor, deadline: float) -> float:
    """The sender sends `x` and waits for a small reply; the receiver receives and replies. The
    reply is what lets the sender time the whole trip on its own clock."""
    src, dst = link.ranks
    start = time.perf_counter()
    if ctx.rank == src:
        _wait(dist.isend(x, dst=dst), ctx, link, f"send of {_size(x)} to rank {dst}", deadline)
        _wait(dist.irecv(ack, src=dst), ctx, link, f"receive of the reply from rank {dst}", deadline)
    else:
        _wait(dist.irecv(x, src=src), ctx, link, f"receive of {_size(x)} from rank {src}", deadline)
        _wait(dist.isend(ack, dst=src), ctx, link, f"reply to rank {src}", deadline)
    return time.perf_counter() - start


def _wait(work: dist.Work, ctx: ParallelContext, link: Link, what: str, deadline: float) -> None:
    left = deadline - time.monotonic()
    try:
        if left <= 0 or not work.wait(timeout=timedelta(seconds=left)):
            raise LinkError(link.name, "deadline passed")
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
    except Exception as e:  # gloo and NCCL raise RuntimeError or DistBackendError, with their own text
        reason = "timed out" if "time" in str(e).lower() or "deadline" in str(e) else f"failed ({_first_line(e)})"
        raise LinkError(f"{link.name} (ranks {link.peers})", f"rank {ctx.rank}'s {what} {reason}") from None


def _size(x: torch.Tensor) -> str:
    nbytes = x.numel() * x.element_size()
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
