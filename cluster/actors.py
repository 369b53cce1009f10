"""The Ray side of a shard: `ShardActor` hosts one `shard.worker.ShardWorker` (one GPU, or one CPU
slot here), and `RayExecutor` drives a replica's actors one step at a time.

Control goes over Ray, tensors over torch.distributed. Every actor gets each step as a plain
actor call, in the same order (Ray runs one caller's calls to a sync actor in submission order),
so stage k starts batch B as soon as it has passed batch A on to stage k+1: the pipeline fills
without any extra scheduling. Why actor calls rather than a broadcast from rank 0 or a compiled
graph: see the README (measured per-step costs).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist

from shard.layout import Layout
from shard.parallel import Endpoint, init_parallel, open_store, shutdown_parallel
from shard.worker import ShardWorker, StepInput, StepOutput


@dataclass(frozen=True)
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


class ShardDied(RuntimeError):
    """A shard actor died or raised during a step."""


def last_line(e: BaseException) -> str:
    """Ray's errors carry tracebacks and actor details over many lines; the last one says why."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


class ShardActor:
    def __init__(self, spec: ShardSpec):
        self.spec = spec
        self.worker: ShardWorker | None = None
        self._store: dist.TCPStore | None = None
        torch.set_num_threads(spec.cpu_threads)

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "host": socket.gethostname(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def open_store(self) -> tuple[str, int]:
        """Rank 0 only: serves the rendezvous store on a free port and says where (a new one each
        call: a repaired replica's world meets on a fresh store)."""
        host = ray.util.get_node_ip_address()
        self._store = open_store(Endpoint(host, 0, self.spec.collective_timeout_s), 0, self.spec.layout.world_size)
        return host, self._store.port

    def setup(self, host: str, port: int) -> dict:
        """Joins the replica's process groups, loads this rank's weights and allocates its KV cache."""
        s, start = self.spec, time.monotonic()
        device = self._device()
        endpoint = Endpoint(host, port, s.collective_timeout_s)
        store = self._store or open_store(endpoint, s.rank, s.layout.world_size)
        ctx = init_parallel(s.layout, s.rank, endpoint, device, store=store if s.layout.world_size > 1 else None)
        self.worker = ShardWorker(s.model_dir, ctx, dtype=s.dtype, num_blocks=s.num_blocks, block_size=s.block_size,
                                  progress=False, cuda_graphs=s.cuda_graphs, graph_max_batch=s.graph_max_batch,
                                  fp8_scaled_mm_min_rows=s.fp8_scaled_mm_min_rows)
        if s.layout.world_size > 1:
            dist.barrier(group=ctx.cpu_group)
        return {"rank": s.rank, "device": str(device), "seconds": time.monotonic() - start,
                "weight_bytes": sum(p.numel() * p.element_size() for p in self.worker.model.parameters())}

    def leave(self) -> None:
        """Leaves the replica's process groups, keeping the weights and the KV cache: the first half
        of a repair, on a rank that survived a peer's death."""
        shutdown_parallel()
        self._store = None

    def rejoin(self, host: str, port: int) -> dict:
        """Joins the repaired replica's new world (the second half of a repair). The model's layers
        hold this rank's `ParallelContext`, so the new groups go into that same object."""
        s, start = self.spec, time.monotonic()
        endpoint = Endpoint(host, port, s.collective_timeout_s)
        store = self._store or open_store(endpoint, s.rank, s.layout.world_size)
        if s.layout.world_size > 1:  # a world of one has no groups to re-form
            fresh = init_parallel(s.layout, s.rank, endpoint, self.worker.ctx.device, store=store)
            self.worker.ctx.tp_group, self.worker.ctx.cpu_group = fresh.tp_group, fresh.cpu_group
            dist.barrier(group=fresh.cpu_group)
        return {"rank": s.rank, "seconds": time.monotonic() - start}

    def execute(self, step: StepInput) -> StepOutput | None:
        return self.worker.execute(step)

    def ping(self) -> bool:
        return self.worker is not None

    def shutdown(self) -> None:
        shutdown_parallel()

    def _device(self) -> torch.device:
        return shard_device(self.spec.device)


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


class RayExecutor:
    """Sends each step to every actor of the replica and returns the last stage's output. Waiting
    on every actor, not only the last, is what turns a dead actor into an error at once."""

    def __init__(self, actors: list, names: list[str], layout: Layout):
        self.actors, self.names, self.layout = actors, names, layout
        self._last = layout.rank(layout.pp - 1, 0)

    async def execute(self, step: StepInput) -> StepOutput:
        outputs = await asyncio.gather(*(self._call(actor, name, step) for actor, name in zip(self.actors, self.names)))
        return outputs[self._last]

    @staticmethod
    async def _call(actor, name: str, step: StepInput) -> StepOutput | None:
        try:
            return await actor.execute.remote(step)
        except ray.exceptions.RayActorError as e:
            # Ray's message goes on for a paragraph on possible causes; its first sentence says what happened.
            raise ShardDied(f"shard {name} died ({last_line(e).split('. ')[0]})") from None
        except ray.exceptions.RayTaskError as e:
            raise ShardDied(f"shard {name} failed a step: {last_line(e)}") from None

    async def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
