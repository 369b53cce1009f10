"""What the router talks to: the replicas of a Ray Serve application, or one engine in this process.

`ServeBackend` is production: requests go through Serve's handle (its request router picks the
replica with the most free capacity), reports come from the registry actor, and scaling changes the
application's replica count. `LocalBackend` runs one engine over an in-process shard, so the
router's own behaviour (validation, admission, streaming, cancellation) is tested and benchmarked
without a Ray cluster in the way.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from cluster.config import ServeConfig
from cluster.engine import Engine
from cluster.scheduler import TokenUpdate
from shard.sampler import SamplingParams


class ServeBackend:
    def __init__(self, config: ServeConfig, model_dir: str, *, handle=None):
        from cluster.serve import ReplicaClient
        self.config, self.model_dir = config, model_dir
        self.client = ReplicaClient(config.name, handle=handle, wait_s=config.router.wait_for_replica_s)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenUpdate]:
        return self.client.generate(prompt_ids, params)

    async def infos(self) -> list:
        return await self.client.infos()

    async def scale(self, replicas: int) -> int:
        """As a dashboard PUT with a new num_replicas: the declared Serve config changes with it."""
        from cluster.app import scale
        return await asyncio.to_thread(scale, self.config, replicas)

    async def target_replicas(self) -> int:
        """What Serve works towards, whoever set it (Admin.Scale, the dashboard, a redeploy)."""
        from cluster.serve import target_replicas
        return await asyncio.to_thread(target_replicas, self.config.name)

    async def pending(self, reporting: int) -> str:
        """Why fewer than the target replicas report: starting, or not placeable with what the
        cluster has free (a node was lost), naming what is missing."""
        target = await self.target_replicas()
        if reporting >= target:
            return ""
        return await asyncio.to_thread(_pending, self.config, target - reporting)

    async def close(self) -> None:
        """The replicas stay up: they belong to the Serve application, not to this router."""


def _pending(config: ServeConfig, missing: int) -> str:
    from cluster.placement import cluster_nodes, free_nodes, shard_resource, shortfall
    from shard.layout import Layout
    resource = shard_resource(config.shard.device, cluster_nodes())  # by what the nodes have, not what is free
    layout = Layout(config.layout.tp, config.layout.pp)
    lack = shortfall(layout, missing, resource, free_nodes(), "what is free")
    if lack is None:
        return f"{missing} replica(s) starting (placement, shards, weights)"
    return f"cannot be placed now: {lack}; Serve places them when nodes come back or are added"


class LocalBackend:
    """One engine in this process, reported the way a Serve replica reports itself (an idle engine
    is probed with a one-token request, as `ReplicaServer.check_health` does)."""

    def __init__(self, engine: Engine, *, probe_after_s: float = 1.0, name: str = "local"):
        self.engine, self.name, self.probe_after_s = engine, name, probe_after_s

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenUpdate]:
        return self.engine.generate(prompt_ids, params)

    async def infos(self) -> list:
        from cluster.engine import probe
        from cluster.serve import ReplicaInfo
        if self.engine.needs_probe(self.probe_after_s):
            await probe(self.engine)
        age = time.monotonic() - self.engine.last_progress
        return [ReplicaInfo(self.name, [], self.engine.stats(), progress_age_s=age, shard_healthy=[])]

    async def scale(self, replicas: int) -> int:
        from cluster.placement import PlacementError
        if replicas != 1:
            raise PlacementError("an in-process backend has exactly one replica; serve on Ray to scale")
        return 1

    async def target_replicas(self) -> int:
        return 1

    async def pending(self, reporting: int) -> str:
        return ""

    async def close(self) -> None:
        await self.engine.close()
