"""One model replica as local processes, without Ray: `caravan generate` and the tests use it.

The calling process is rank 0 (stage 0, TP rank 0) and drives: it broadcasts each step to the
other ranks over the gloo group, runs its own shard, and receives the sampled tokens from the
last stage. Ranks 1..world-1 are spawned processes that loop on steps until told to stop. Its
`execute(step)` is a worker's, so an engine or the offline driver drives it through
`cluster.engine.executor.LocalExecutor`.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.runtime.ports import free_port
from shard.config import ModelConfig
from shard.layout import Layout, check_layout
from shard.loader import Checkpoint
from shard.parallel import Endpoint, ParallelContext, init_parallel, shutdown_parallel
from shard.worker import ShardWorker, StepInput, StepOutput


class ReplicaError(RuntimeError):
    """A rank failed; the message carries every failed rank's traceback."""


def threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


class LocalReplica:
    def __init__(self, model_dir: str | Path, layout: Layout, *, dtype: torch.dtype = torch.float32,
                 num_blocks: int, block_size: int = 16, timeout_s: float = 120.0, progress: bool = True,
                 draft_model: str | Path | None = None):
        """`draft_model`: a draft checkpoint for speculative decoding, run unsharded in this process
        beside rank 0 (`cluster.engine.draft_model`); `draft` is then its stepper."""
        self.cfg = ModelConfig.from_pretrained(model_dir)
        # Everything that can be checked without tensor data is checked here, once, before any
        # process starts: a bad layout or checkpoint fails in a second with one clear message.
        check_layout(self.cfg, layout)
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must both be at least 1")
        Checkpoint.open(model_dir).validate(self.cfg)
        self.layout, self.block_size, self.num_blocks = layout, block_size, num_blocks
        self._procs: list[mp.Process] = []
        endpoint = Endpoint(port=free_port(), timeout_s=timeout_s)
        # forkserver: torch is imported once in the server and every rank forks from it (seconds
        # saved per rank on a small machine); the server never touches CUDA, so forking is safe.
        procs = mp.get_context("forkserver")
        procs.set_forkserver_preload(["torch", "cluster.runtime.processes"])
        self._errors = procs.SimpleQueue()
        threads = threads_per_rank(layout.world_size)
        for rank in range(1, layout.world_size):
            p = procs.Process(target=_rank_main, daemon=True, name=f"caravan-rank{rank}",
                              args=(rank, str(model_dir), layout, endpoint, dtype, num_blocks, block_size,
                                    threads, self._errors))
            p.start()
            self._procs.append(p)
        torch.set_num_threads(threads)
        try:
            self.ctx: ParallelContext = init_parallel(layout, 0, endpoint)
            self.worker = ShardWorker(model_dir, self.ctx, dtype=dtype, num_blocks=num_blocks,
                                      block_size=block_size, progress=progress)
            self.draft = None if draft_model is None else ShardWorker(
                draft_model, ParallelContext(Layout()), dtype=dtype, num_blocks=num_blocks, block_size=block_size,
                progress=False)
            if layout.world_size > 1:
                dist.barrier(group=self.ctx.cpu_group)  # every rank has loaded
        except BaseException as e:
            self._fail(e)
        self._last = layout.rank(layout.pp - 1, 0)

    def execute(self, step: StepInput) -> StepOutput:
        try:
            if self.layout.world_size > 1:
                dist.broadcast_object_list([step], src=0, group=self.ctx.cpu_group)
            out = self.worker.execute(step)
            if self._last != 0:
                box: list[StepOutput | None] = [None]
                dist.recv_object_list(box, src=self._last, group=self.ctx.cpu_group)
                out = box[0]
        except BaseException as e:
            self._fail(e)
        assert out is not None
        return out

    def close(self) -> None:
        if self.layout.world_size > 1 and dist.is_initialized():
            try:
                dist.broadcast_object_list([None], src=0, group=self.ctx.cpu_group)
            except RuntimeError:
                pass  # a rank is already gone; the processes are reaped below either way
        shutdown_parallel()
        self._reap(grace_s=10)

    def __enter__(self) -> "LocalReplica":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _reap(self, grace_s: float) -> None:
        """Waits for the ranks to exit, kills those that do not, and leaves no process behind."""
        for p in self._procs:
            p.join(timeout=grace_s)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []

    def _fail(self, error: BaseException) -> None:
        """Tears everything down and raises with the tracebacks of the ranks that failed."""
        shutdown_parallel()
        self._reap(grace_s=2)  # survivors see the broken group and exit, reporting why
        reports = []
        while not self._errors.empty():
            rank, tb = self._errors.get()
            reports.append(f"--- rank {rank} ---\n{tb}")
        if reports:
            raise ReplicaError(f"replica {self.layout} failed on rank 0 ({error!r}); other ranks:\n"
                               + "\n".join(reports)) from error
        raise error


def _rank_main(rank: int, model_dir: str, layout: Layout, endpoint: Endpoint, dtype: torch.dtype,
               num_blocks: int, block_size: int, threads: int, errors) -> None:
    torch.set_num_threads(threads)
    try:
        ctx = init_parallel(layout, rank, endpoint)
        worker = ShardWorker(model_dir, ctx, dtype=dtype, num_blocks=num_blocks, block_size=block_size,
                             progress=False)
        dist.barrier(group=ctx.cpu_group)
        last = layout.rank(layout.pp - 1, 0)
        while True:
            box: list[StepInput | None] = [None]
            dist.broadcast_object_list(box, src=0, group=ctx.cpu_group)
            if box[0] is None:
                break
            out = worker.execute(box[0])
            if rank == last:
                dist.send_object_list([out], dst=0, group=ctx.cpu_group)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        shutdown_parallel()
