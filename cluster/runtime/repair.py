"""In-place repair of a replica whose engine failed (a shard died, a step hung): ranks that answer keep
their processes, weights and KV memory and only re-form their process groups; the lost ranks start
afresh in their own bundles and load their slices. Seconds, where a new replica takes tens of them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import ray

from cluster.runtime.replica import RayReplica, ReplicaStartError, answers, await_setup, phases
from cluster.runtime.shard_actor import last_line


@dataclass
class RepairReport:
    """What an in-place repair did: which ranks were replaced, which kept their weights, and where
    the time went (seconds per phase, in order)."""
    replaced: list[int]
    kept: list[int]
    phases: dict[str, float]

    def __str__(self) -> str:
        return (f"ranks {self.replaced} replaced, {len(self.kept)} kept their weights; "
                f"{sum(self.phases.values()):.1f} s ({phases(self.phases)})")


class _Phases(dict):
    """Seconds per phase, each measured from the end of the one before."""

    def __init__(self) -> None:
        super().__init__()
        self._mark = time.monotonic()

    def done(self, name: str) -> None:
        now = time.monotonic()
        self[name], self._mark = now - self._mark, now


async def repair(replica: RayReplica, ping_s: float) -> RepairReport:
    """Brings a replica whose engine failed back into service without leaving its placement group:
    ranks that answer a ping within `ping_s` keep their processes and weights and only leave their
    process groups; the others (dead, stuck, or blocked in a collective with a dead peer) are killed
    and started afresh in their bundles, loading their slices; then the whole world meets again on a
    new store. The engine must have failed first (every sequence gone), and is resumed by the caller.
    Raises `ReplicaStartError` (naming the rank) when a rank cannot come back within
    `timeouts.repair_s`; the caller then gives the replica up."""
    limit_s = replica.cfg.timeouts.repair_s
    deadline, timings = time.monotonic() + limit_s, _Phases()
    alive = await replica.ping(ping_s)
    left = iter(await asyncio.gather(*(answers(a.leave.remote(), ping_s)
                                       for a, ok in zip(replica.actors, alive) if ok)))
    replaced = [i for i, ok in enumerate(alive) if not (ok and next(left))]
    for i in replaced:
        ray.kill(replica.actors[i], no_restart=True)
    timings.done("ping and leave")
    for i in replaced:
        replica.actors[i] = await _spawn_when_free(replica, i, deadline)
    await await_setup(replica.name, {replica.actors[i].where.remote(): replica.places[i] for i in replaced},
                      deadline, "timeouts.repair_s", limit_s)
    timings.done("new processes up")
    host, port = await _store(replica, deadline)
    calls = {(a.setup if i in replaced else a.rejoin).remote(host, port): replica.places[i]
             for i, a in enumerate(replica.actors)}
    await await_setup(replica.name, calls, deadline, "timeouts.repair_s", limit_s)
    timings.done("load and rejoin")
    replica.engine.executor.actors = replica.actors
    return RepairReport(replaced, [i for i in range(len(replica.actors)) if i not in replaced], dict(timings))


async def _spawn_when_free(replica: RayReplica, index: int, deadline: float):
    """A new actor under the killed one's name, once Ray has released the name (a kill is
    asynchronous)."""
    while True:
        try:
            return replica.spawn(index)
        except ValueError as e:  # the name is still taken
            if time.monotonic() > deadline:
                raise ReplicaStartError(f"rank {replica.places[index].rank}: {e}") from None
            await asyncio.sleep(0.05)


async def _store(replica: RayReplica, deadline: float) -> tuple[str, int]:
    """Rank 0's fresh rendezvous store, within the repair's deadline."""
    p = replica.places[0]
    try:
        return await asyncio.wait_for(asyncio.wrap_future(replica.actors[0].open_store.remote().future()),
                                      max(0.0, deadline - time.monotonic()))
    except (TimeoutError, asyncio.TimeoutError):
        raise ReplicaStartError(f"{replica.name}: rank {p.rank} did not open its store within timeouts.repair_s="
                                f"{replica.cfg.timeouts.repair_s:g} s") from None
    except ray.exceptions.RayError as e:
        raise ReplicaStartError(f"{replica.name}: rank {p.rank} (stage {p.stage}, tp {p.tp_rank}) on {p.ip} failed "
                                f"to open its store: {last_line(e)}") from e
