"""Process groups for one replica: TP groups inside each stage, point-to-point between stages.

One code path for every device: NCCL where the tensors live on CUDA, gloo on CPU. A world of
size 1 builds no process group at all, so a shard runs in a plain test process. Every
collective runs under the group's timeout, so a lost peer becomes an error, never a hang.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from shard.layout import Layout


@dataclass(frozen=True)
class Endpoint:
    """Where rank 0 listens for the others to join."""

    host: str = "127.0.0.1"
    port: int = 29500
    timeout_s: float = 60.0


@dataclass
class ParallelContext:
    layout: Layout
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: dist.ProcessGroup | None = None
    # Control messages (step inputs, sampled tokens) go over gloo even when tensors use NCCL.
    cpu_group: dist.ProcessGroup | None = None

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the stage's TP ranks, in place."""
        if self.layout.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each TP rank -> [..., n * tp], ranks in order."""
        if self.layout.tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.layout.tp)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def send_next(self, x: torch.Tensor) -> None:
        """Hidden states to the same TP rank of the next stage."""
        dist.send(x.contiguous(), dst=self.rank + self.layout.tp)

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(x, src=self.rank - self.layout.tp)
        return x


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def open_store(endpoint: Endpoint, rank: int, world_size: int) -> dist.TCPStore:
    """The rendezvous store. Rank 0 serves it; with `endpoint.port` 0 it binds a free port
    (read it back from `.port`), so no other process can take the port between choosing and binding."""
    return dist.TCPStore(endpoint.host, endpoint.port, world_size, is_master=rank == 0,
                         timeout=timedelta(seconds=endpoint.timeout_s), wait_for_workers=False)


def init_parallel(layout: Layout, rank: int, endpoint: Endpoint, device: torch.device | None = None,
                  store: dist.Store | None = None) -> ParallelContext:
    """Joins the replica's world and builds its groups. Every rank calls this with the same
    layout and endpoint (or a store from `open_store`); with a world of one it returns at once."""
    device = device or torch.device("cpu")
    if layout.world_size == 1:
        return ParallelContext(layout, 0, device)
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed world; "
                           "call shutdown_parallel() before joining another")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=endpoint.timeout_s)
    where = dict(store=store) if store is not None else dict(init_method=f"tcp://{endpoint.host}:{endpoint.port}")
    dist.init_process_group(backend_for(device), rank=rank, world_size=layout.world_size, timeout=timeout, **where)
    tp_group = None
    # new_group is collective: every rank creates every stage's group, in the same order.
    for pp_rank in range(layout.pp):
        ranks = [layout.rank(pp_rank, t) for t in range(layout.tp)]
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            tp_group = group
    cpu_group = dist.group.WORLD if device.type != "cuda" else dist.new_group(backend="gloo", timeout=timeout)
    return ParallelContext(layout, rank, device, tp_group, cpu_group)


def shutdown_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
