"""The Ray side of a shard: `ShardActor` hosts one `shard.worker.ShardWorker` (one GPU, or one CPU
slot here): it joins the replica's process groups, loads its slice, runs steps, and leaves and
rejoins its groups when a peer is repaired. `cluster.runtime.ray_executor` drives it.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist

from cluster.engine import heap
from cluster.runtime.rendezvous import Rendezvous
from shard.layout import Layout
from shard.parallel import ParallelContext, shutdown_parallel
from shard.worker import ShardWorker, StepInput, StepOutput


@dataclass(frozen=True, kw_only=True)
class ShardSpec:
    model_dir: str
    layout: Layout
    rank: int
    dtype: torch.dtype
    num_blocks: int
    block_size: int
    device: str               # auto | cpu | cuda
    cpu_threads: int
    collective_timeout_s: float
    cuda_graphs: bool = False   # decode steps as CUDA graphs, of up to graph_max_batch sequences (on CUDA only)
    graph_max_batch: int = 256
    fp8_scaled_mm_min_rows: int = 1024  # FP8 checkpoints on CUDA: rows from which the GEMMs quantise activations
    draft_model_dir: str | None = None  # rank 0 with speculative.method draft: the draft model, beside its shard


def last_line(e: BaseException) -> str:
    """Ray's errors carry tracebacks and actor details over many lines; the last one says why."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


class ShardActor:
    def __init__(self, spec: ShardSpec):
        self.spec = spec
        self.worker: ShardWorker | None = None
        self.drafter: ShardWorker | None = None   # the replica's draft model (`cluster.engine.draft_model`)
        self._rendezvous = Rendezvous(spec.layout, spec.rank, spec.collective_timeout_s)
        torch.set_num_threads(spec.cpu_threads)

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "host": socket.gethostname(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def open_store(self) -> tuple[str, int]:
        """Rank 0 only: serves the rendezvous store on a free port and says where (a new one each
        call: a repaired replica's world meets on a fresh store)."""
        return self._rendezvous.open()

    def setup(self, host: str, port: int) -> dict:
        """Joins the replica's process groups, loads this rank's weights and allocates its KV cache."""
        s, start = self.spec, time.monotonic()
        device = shard_device(s.device)
        ctx = self._rendezvous.join(host, port, device)
        self.worker = ShardWorker(s.model_dir, ctx, dtype=s.dtype, num_blocks=s.num_blocks, block_size=s.block_size,
                                  progress=False, cuda_graphs=s.cuda_graphs, graph_max_batch=s.graph_max_batch,
                                  fp8_scaled_mm_min_rows=s.fp8_scaled_mm_min_rows)
        if s.draft_model_dir is not None:  # unsharded, on this rank's device, with the target's block ids
            self.drafter = ShardWorker(s.draft_model_dir, ParallelContext(Layout(), 0, device), dtype=s.dtype,
                                       num_blocks=s.num_blocks, block_size=s.block_size, progress=False)
        if s.layout.world_size > 1:
            dist.barrier(group=ctx.cpu_group)
        heap.settle()  # weights loaded: keep collections out of the steps
        return {"rank": s.rank, "device": str(device), "seconds": time.monotonic() - start,
                "weight_bytes": sum(p.numel() * p.element_size() for p in self.worker.model.parameters())}

    def leave(self) -> None:
        """Leaves the replica's process groups, keeping the weights and the KV cache: the first half
        of a repair, on a rank that survived a peer's death."""
        shutdown_parallel()
        self._rendezvous.forget()

    def rejoin(self, host: str, port: int) -> dict:
        """Joins the repaired replica's new world (the second half of a repair). The model's layers
        hold this rank's `ParallelContext`, so the new groups go into that same object."""
        s, start = self.spec, time.monotonic()
        if s.layout.world_size > 1:  # a world of one has no groups to re-form
            fresh = self._rendezvous.join(host, port, self.worker.ctx.device)
            self.worker.ctx.tp_group, self.worker.ctx.cpu_group = fresh.tp_group, fresh.cpu_group
            dist.barrier(group=fresh.cpu_group)
        return {"rank": s.rank, "seconds": time.monotonic() - start}

    def execute(self, step: StepInput) -> StepOutput | None:
        return self.worker.execute(step)

    def draft(self, step: StepInput) -> StepOutput:
        """A step of the draft model (rank 0 only): greedy tokens for `cluster.engine.draft_model`."""
        return self.drafter.execute(step)

    def ping(self) -> bool:
        return self.worker is not None


def shard_device(device: str) -> torch.device:
    """The device a shard actor computes on, for `shard.device` (auto: the GPU Ray gave it, if torch
    sees one; else the CPU)."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available() and ray.get_gpu_ids()):
        if not torch.cuda.is_available():
            raise RuntimeError("shard.device is cuda but this process sees no CUDA device "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        return torch.device("cuda", 0)  # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU
    return torch.device("cpu")


RemoteShard = ray.remote(ShardActor)
