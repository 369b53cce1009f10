"""Replicas as a Ray Serve deployment: Serve owns their lifecycle (one placement group per replica,
health checks, restarts, scaling from the dashboard); each replica runs an engine over its shards.

A replica's placement group is bundle 0 for the replica itself (the engine: scheduling and
streaming only) plus one bundle per shard. `check_health` fails as soon as the engine has failed
(a dead shard or a step past its timeout) or, while idle, when a shard does not answer a ping;
Serve then kills the replica, whose shards die with it, and starts a fresh one.

`ReplicaClient` is the in-process API over the deployment that the router uses: it streams a
request's tokens and sends a request that failed before its first token to another replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import AsyncIterator

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util import get_current_placement_group

from cluster.actors import last_line
from cluster.config import ServeConfig
from cluster.engine import EngineStats, ReplicaFailed, ReplicaUnavailable
from cluster.placement import ENGINE_BUNDLE, ShardPlace, check_capacity, cluster_nodes, replica_bundles, shard_resource
from cluster.replica import start_replica
from cluster.scheduler import TokenUpdate
from shard.layout import Layout
from shard.sampler import SamplingParams

log = logging.getLogger(__name__)

DEPLOYMENT = "replica"
NAMESPACE = "caravan"


@dataclass(frozen=True)
class ReplicaInfo:
    name: str
    shards: list[ShardPlace]
    stats: EngineStats


def registry_name(app_name: str) -> str:
    return f"{app_name}-registry"


@ray.remote(num_cpus=0)
class Registry:
    """Where replicas say how they are, so that status and routing can see each one (Serve's
    handle hides which replica answers). Each replica reports at every health check; an entry not
    refreshed for `max_age_s` belongs to a replica that is gone."""

    def __init__(self, max_age_s: float):
        self.max_age_s = max_age_s
        self._seen: dict[str, tuple[float, ReplicaInfo]] = {}

    def report(self, info: ReplicaInfo) -> None:
        self._seen[info.name] = (time.monotonic(), info)

    def drop(self, name: str) -> None:
        self._seen.pop(name, None)

    def infos(self) -> list[ReplicaInfo]:
        now = time.monotonic()
        self._seen = {k: (t, i) for k, (t, i) in self._seen.items() if now - t <= self.max_age_s}
        return [i for _, i in sorted(self._seen.values(), key=lambda ti: ti[1].name)]


class ReplicaServer:
    def __init__(self, config: ServeConfig, model_dir: str, resource: str):
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.config = config
        self.replica = start_replica(config, model_dir, get_current_placement_group(), f"{config.name}-{replica_id}",
                                     resource)
        self.engine = self.replica.engine
        self.registry = ray.get_actor(registry_name(config.name), namespace=NAMESPACE)
        self.registry.report.remote(self._info())

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenUpdate]:
        async for update in self.engine.generate(prompt_ids, params):
            yield update

    def _info(self) -> ReplicaInfo:
        return ReplicaInfo(self.replica.name, self.replica.places, self.engine.stats())

    async def check_health(self) -> None:
        self.registry.report.remote(self._info())
        if self.engine.failed is not None:
            raise RuntimeError(f"{self.replica.name} failed: {self.engine.failed}")
        stats = self.engine.stats()
        if stats.running == 0 and stats.waiting == 0:
            # Idle: no step would notice a dead shard, so ask each one. (While steps run, a dead or
            # stuck shard fails the engine within the step timeout.)
            pings = [a.ping.remote() for a in self.replica.actors]
            await asyncio.wait_for(asyncio.gather(*pings), self.config.timeouts.step_s)

    def record_routing_stats(self) -> dict:
        return asdict(self.engine.stats())

    async def __del__(self):
        self.registry.drop.remote(self.replica.name)
        await self.engine.close()


def build_app(config: ServeConfig, model_dir: str):
    """The Serve application for `config`; checks first that the cluster can hold it."""
    layout = Layout(config.layout.tp, config.layout.pp)
    nodes = cluster_nodes()
    resource = shard_resource(config.shard.device, nodes)
    check_capacity(layout, config.replicas, resource, nodes)
    t = config.timeouts
    return serve.deployment(ReplicaServer, name=DEPLOYMENT).options(
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": ENGINE_BUNDLE["CPU"]},
        placement_group_bundles=replica_bundles(layout, resource),
        placement_group_strategy="PACK",
        health_check_period_s=t.health_check_period_s,
        health_check_timeout_s=t.step_s + 5,
        max_ongoing_requests=100_000,       # the engine's scheduler is the queue; Serve only forwards
        graceful_shutdown_timeout_s=5,
        max_constructor_retry_count=2,      # a shard that cannot load will not load on the third try either
    ).bind(config, model_dir, resource)


def deploy(config: ServeConfig, model_dir: str) -> "ReplicaClient":
    """Deploys (or redeploys) the application and waits until every replica is up."""
    serve.start(proxy_location="Disabled")
    Registry.options(name=registry_name(config.name), namespace=NAMESPACE, get_if_exists=True,
                     lifetime="detached").remote(3 * config.timeouts.health_check_period_s + 2)
    serve.run(build_app(config, model_dir), name=config.name, route_prefix=None)
    return ReplicaClient(config.name)


class ReplicaClient:
    """Streams requests to the application's replicas; Serve picks the replica."""

    RETRYABLE = (ReplicaFailed, RayActorError, ActorDiedError, ActorUnavailableError)

    def __init__(self, app_name: str, *, attempts: int = 6, backoff_s: float = 0.5):
        self.handle = serve.get_deployment_handle(DEPLOYMENT, app_name)
        self.registry = ray.get_actor(registry_name(app_name), namespace=NAMESPACE)
        self.attempts, self.backoff_s = attempts, backoff_s

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenUpdate]:
        """A request's tokens. One that fails before its first token (its replica died or was out
        of service) is sent again, up to `attempts` times; after a token it fails as it is."""
        for attempt in range(1, self.attempts + 1):
            produced = 0
            try:
                stream = self.handle.options(stream=True).generate.remote(prompt_ids, params)
                async for update in stream:
                    produced += 1
                    yield update
                return
            except self.RETRYABLE as e:
                retryable = produced == 0 and getattr(e, "retryable", True)
                if not retryable or attempt == self.attempts:
                    raise ReplicaFailed(f"{_cause(e)} (attempt {attempt} of {self.attempts}, after {produced} "
                                        f"tokens)", retryable=False) from e
                log.info("request failed before its first token (%s); retrying", _cause(e))
                await asyncio.sleep(self.backoff_s * attempt)

    async def infos(self) -> list[ReplicaInfo]:
        """What each live replica last reported (within three health-check periods)."""
        return await self.registry.infos.remote()


def _cause(e: BaseException) -> str:
    """The original error's message: Ray wraps what a replica raised in a RayTaskError."""
    return last_line(getattr(e, "cause", None) or e)
