"""`ServeBackend`: the router's backend (`cluster.api.backend.Backend`) in production. Requests go
through Serve's handle (its request router picks the replica), reports come from the registry actor,
and scaling changes the application's replica count as a dashboard PUT does.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from cluster.config import ServeConfig
from cluster.deploy.controller import scale, target_replicas
from cluster.deploy.replica_client import ReplicaClient
from cluster.engine.grammar import Constraint
from cluster.engine.scheduler import TokenUpdate
from cluster.runtime.placement import cluster_nodes, free_nodes, shard_resource, shortfall
from cluster.runtime.report import ReplicaInfo
from shard.sampler import SamplingParams


class ServeBackend:
    def __init__(self, config: ServeConfig, model_dir: str, *, handle=None):
        self.config, self.model_dir = config, model_dir
        self.client = ReplicaClient(config.name, handle=handle, wait_s=config.router.wait_for_replica_s)

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 constraint: Constraint | None = None) -> AsyncIterator[TokenUpdate]:
        return self.client.generate(prompt_ids, params, constraint)

    async def infos(self) -> list[ReplicaInfo]:
        return await self.client.infos()

    async def scale(self, replicas: int) -> int:
        """As a dashboard PUT with a new num_replicas: the declared Serve config changes with it."""
        return await asyncio.to_thread(scale, self.config, replicas)

    async def target_replicas(self) -> int:
        """What Serve works towards, whoever set it (Admin.Scale, the dashboard, a redeploy)."""
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
    resource = shard_resource(config.shard.device, cluster_nodes())  # by what the nodes have, not what is free
    lack = shortfall(config.shard_layout, missing, resource, free_nodes(), "what is free")
    if lack is None:
        return f"{missing} replica(s) starting (placement, shards, weights)"
    return f"cannot be placed now: {lack}; Serve places them when nodes come back or are added"
