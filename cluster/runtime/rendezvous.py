"""How the ranks of one replica (its shards, or the doctor's probes that stand in for them) meet:
rank 0 serves a rendezvous store on a free port of its node, says where, and every rank joins the
process groups through it (`shard.parallel`). A repaired replica meets on a fresh store."""

from __future__ import annotations

import ray
import torch
import torch.distributed as dist

from shard.layout import Layout
from shard.parallel import Endpoint, ParallelContext, init_parallel, open_store


class Rendezvous:
    def __init__(self, layout: Layout, rank: int, timeout_s: float):
        self.layout, self.rank, self.timeout_s = layout, rank, timeout_s
        self._store: dist.TCPStore | None = None

    def open(self) -> tuple[str, int]:
        """Rank 0 only: serves a new store and says where."""
        host = ray.util.get_node_ip_address()
        self._store = open_store(Endpoint(host, 0, self.timeout_s), 0, self.layout.world_size)
        return host, self._store.port

    def join(self, host: str, port: int, device: torch.device) -> ParallelContext:
        """This rank's process groups, through the store at `host:port` (rank 0's own, on rank 0)."""
        endpoint = Endpoint(host, port, self.timeout_s)
        store = self._store or open_store(endpoint, self.rank, self.layout.world_size)
        return init_parallel(self.layout, self.rank, endpoint, device,
                             store=store if self.layout.world_size > 1 else None)

    def forget(self) -> None:
        """The store is spent (the world it served is gone); the next `open` serves a new one."""
        self._store = None
