"""What the front doors talk to: the replicas, behind one `Backend` interface.

`cluster.deploy.backend.ServeBackend` is production (Ray Serve's replicas). `LocalBackend` runs one
engine in this process, reported the way a Serve replica reports itself, so the router's own
behaviour (validation, admission, streaming, cancellation) is tested and benchmarked without a Ray
cluster in the way.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Protocol

from cluster.engine.engine import Engine, probe
from cluster.engine.grammar import Constraint
from cluster.engine.scheduler import TokenUpdate
from cluster.runtime.placement import PlacementError
from cluster.runtime.report import ReplicaInfo
from shard.sampler import SamplingParams


class Backend(Protocol):
    """The replicas, as the router sees them."""

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 constraint: Constraint | None = None) -> AsyncIterator[TokenUpdate]: ...

    async def infos(self) -> list[ReplicaInfo]: ...  # one per live replica

    async def scale(self, replicas: int) -> int: ...  # returns the previous target

    async def target_replicas(self) -> int: ...

    async def pending(self, reporting: int) -> str: ...  # why fewer than the target report; "" when none are missing

    async def close(self) -> None: ...               # the router is done with it


class LocalBackend:
    """One engine in this process; an idle engine is probed with a one-token request, as
    `ReplicaServer.check_health` does."""

    def __init__(self, engine: Engine, *, probe_after_s: float = 1.0, name: str = "local"):
        self.engine, self.name, self.probe_after_s = engine, name, probe_after_s

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 constraint: Constraint | None = None) -> AsyncIterator[TokenUpdate]:
        return self.engine.generate(prompt_ids, params, constraint=constraint)

    async def infos(self) -> list[ReplicaInfo]:
        if self.engine.needs_probe(self.probe_after_s):
            await probe(self.engine)
        age = time.monotonic() - self.engine.last_progress
        return [ReplicaInfo(self.name, [], self.engine.stats(), progress_age_s=age, shard_healthy=[])]

    async def scale(self, replicas: int) -> int:
        if replicas != 1:
            raise PlacementError("an in-process backend has exactly one replica; serve on Ray to scale")
        return 1

    async def target_replicas(self) -> int:
        return 1

    async def pending(self, reporting: int) -> str:
        return ""

    async def close(self) -> None:
        await self.engine.close()
