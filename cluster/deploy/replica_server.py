"""Replicas as a Ray Serve deployment: Serve owns their lifecycle (one placement group per replica,
health checks, restarts, scaling from the dashboard); each replica runs an engine over its shards.

A replica's placement group is bundle 0 for the replica itself (the engine: scheduling and
streaming only) plus one bundle per shard. Health has two tiers: while steps complete, they prove
every shard works (each step waits on all of them); an idle replica pings every shard and runs a
one-token probe through its engine. When the engine fails (a dead shard, a step past its timeout)
or a ping or the probe fails, the replica repairs itself in place (`cluster.runtime.repair`: new
shards for the lost ranks only) while its health check still passes; only a repair that fails
within `timeouts.repair_s` fails the check, and Serve then kills the replica, whose shards die with
it, and starts a fresh one. Each check reports to the registry first, so status shows why.

Requests go to the replica with the most free KV capacity, or the one holding the request's prefix
(`cluster.deploy.request_router`). The replica count changes in place (`cluster.deploy.controller`,
or a dashboard PUT): Serve adds or removes replicas and leaves the others running; one being removed
gets no new requests and finishes its in-flight ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import AsyncIterator

import psutil
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.util import get_current_placement_group

from cluster.config import ServeConfig
from cluster.deploy.names import DEPLOYMENT
from cluster.deploy.registry import registry
from cluster.deploy.request_router import PREFIX_SUMMARY_BLOCKS, ROUTING_STATS_PERIOD_S, CapacityRouter, routing_stats
from cluster.engine.engine import ReplicaFailed, probe
from cluster.engine.grammar import Constraint
from cluster.engine.scheduler import TokenUpdate
from cluster.runtime.placement import ENGINE_BUNDLE, cluster_nodes, replica_bundles, shard_resource
from cluster.runtime.repair import repair
from cluster.runtime.replica import phases, start_replica
from cluster.runtime.report import ReplicaInfo
from shard.sampler import SamplingParams

log = logging.getLogger(__name__)

# In-place repairs within timeouts.repair_s before the replica is given up to Serve instead.
MAX_REPAIRS = 3


class ReplicaServer:
    def __init__(self, config: ServeConfig, model_dir: str, resource: str):
        # Since Serve started this process: Python, Ray Serve, torch and this package imported.
        started = {"replica process up": max(0.0, time.time() - psutil.Process().create_time())}
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.config = config
        self.replica = start_replica(config, model_dir, get_current_placement_group(), f"{config.name}-{replica_id}",
                                     resource)
        self.startup = phases({**started, **self.replica.startup})
        self.engine = self.replica.engine
        self.engine.on_failure = self._start_repair
        self.shard_healthy = [True] * len(self.replica.actors)  # start_replica waited on every shard's setup
        self.repairs = 0
        self.last_repair: str | None = None
        self._repair_task: asyncio.Task | None = None
        self._given_up: str | None = None    # set when a repair failed: Serve must replace this replica
        self._failures: list[float] = []      # when the engine failed, within the last timeouts.repair_s
        self.registry = registry(config.name)
        self.registry.report.remote(self._info())

    async def generate(self, prompt_ids: list[int], params: SamplingParams, output_offset: int = 0,
                       constraint: Constraint | None = None) -> AsyncIterator[TokenUpdate]:
        repair = self._repair_task
        if repair is not None and not repair.done():
            # Routed here while the shards are being repaired (the only replica, or a stale report): wait
            # for the repair rather than fail at once, so that the request starts as soon as it is done.
            await asyncio.wait({repair}, timeout=min(self.config.timeouts.repair_s,
                                                     self.config.router.wait_for_replica_s))
        async for update in self.engine.generate(prompt_ids, params, output_offset, constraint):
            yield update

    def _start_repair(self, reason: str) -> None:
        """The engine failed (a shard died, a step hung): every sequence has ended (`ReplicaClient`
        sends each request again, resuming those that had streamed tokens). Repairs the shards in
        place; Serve's health check keeps passing meanwhile, and the engine says it is out of service."""
        if self._repair_task is None or self._repair_task.done():
            self._repair_task = asyncio.get_running_loop().create_task(self._repair(reason),
                                                                       name=f"{self.replica.name}-repair")

    async def _repair(self, reason: str) -> None:
        name, t = self.replica.name, self.config.timeouts
        now = time.monotonic()
        self._failures = [f for f in self._failures if now - f < t.repair_s] + [now]
        if len(self._failures) > MAX_REPAIRS:
            # Failing again and again (a fault that survives repairs): fresh processes everywhere, from Serve.
            self._give_up(f"{reason}; failed {len(self._failures)} times within timeouts.repair_s={t.repair_s:g} s")
            return
        log.warning("%s failed (%s); repairing it in place (timeouts.repair_s=%g)", name, reason, t.repair_s)
        self.engine.failed = f"repairing in place after: {reason}"
        self.registry.report.remote(self._info())
        try:
            report = await repair(self.replica, ping_s=min(t.step_s, 2.0))
        except Exception as e:
            self._give_up(f"{reason}; the in-place repair failed: {e}")
            return
        self.shard_healthy = [True] * len(self.replica.actors)
        self.repairs += 1
        self.last_repair = str(report)
        self.engine.resume()
        log.warning("%s repaired: %s", name, report)
        self.registry.report.remote(self._info())

    def _info(self) -> ReplicaInfo:
        return ReplicaInfo(self.replica.name, self.replica.places, self.engine.stats(),
                           progress_age_s=time.monotonic() - self.engine.last_progress,
                           shard_healthy=list(self.shard_healthy), startup=self.startup, repairs=self.repairs,
                           last_repair=self.last_repair)

    def _give_up(self, why: str) -> None:
        """The next health check fails, and Serve replaces this replica."""
        self._given_up = why
        log.error("%s: %s; Serve will replace the replica", self.replica.name, why)
        self.replica.kill()

    async def check_health(self) -> None:
        """Reports, then raises (so that Serve replaces this replica) if it cannot serve and cannot
        repair itself. While sequences run, steps prove every shard (each step waits on all of them;
        a step past `timeouts.step_s` fails the engine). An idle replica must show it: every shard
        answers a ping and a one-token probe runs through the engine. The probe is an ordinary
        request: it adds one step to the stats per idle check. A failure starts an in-place repair
        (`_repair`), during which the check passes: Serve leaves the replica to it."""
        if self._given_up is None and (self._repair_task is None or self._repair_task.done()):
            if self.engine.failed is None and self.engine.needs_probe(self.config.timeouts.health_check_period_s):
                if (problem := await self._check_idle()) is not None:
                    self.engine.fail(problem)  # starts the repair
            elif self.engine.failed is None:
                # Busy: a long step (a big batch on a slow device) is no fault, so no probe queues behind
                # it and the report goes out now; the router's view never goes stale while it works.
                self.shard_healthy = [True] * len(self.replica.actors)
        self.registry.report.remote(self._info())
        if self._given_up is not None:
            raise RuntimeError(f"{self.replica.name} failed: {self._given_up}")

    async def _check_idle(self) -> str | None:
        """Pings and probes at once, so that the check takes one step timeout at most."""
        healthy, probed = await asyncio.gather(self.replica.ping(self.config.timeouts.step_s), self._probe())
        self.shard_healthy = healthy
        silent = [f"rank {p.rank} (stage {p.stage}, tp {p.tp_rank}) on {p.ip}"
                  for p, ok in zip(self.replica.places, healthy) if not ok]
        if silent:
            return f"no answer to a ping within timeouts.step_s={self.config.timeouts.step_s:g} s: {'; '.join(silent)}"
        return probed

    async def _probe(self) -> str | None:
        try:
            await probe(self.engine, self.config.timeouts.step_s)
        except TimeoutError:
            return f"the idle probe (one token) did not finish within timeouts.step_s={self.config.timeouts.step_s:g} s"
        except ReplicaFailed as e:
            return f"the idle probe failed: {e}"
        return None

    def record_routing_stats(self) -> dict:
        """What `cluster.deploy.request_router.CapacityRouter` ranks replicas by (load, and which prefixes this
        replica has cached); Serve polls it."""
        return routing_stats(asdict(self.engine.stats()), self.config.kv_cache.block_size,
                             self.engine.sched.cached_hashes(PREFIX_SUMMARY_BLOCKS))

    async def __del__(self):
        if self._repair_task is not None:
            self._repair_task.cancel()
        self.registry.drop.remote(self.replica.name)
        await self.engine.close()


def replica_deployment(config: ServeConfig, model_dir: str):
    """The bound `replica` deployment of the application: one placement group per replica."""
    layout = config.shard_layout
    resource = shard_resource(config.shard.device, cluster_nodes())
    t = config.timeouts
    return serve.deployment(ReplicaServer, name=DEPLOYMENT).options(
        num_replicas=config.replicas,       # the Serve config's num_replicas overrides it
        ray_actor_options={"num_cpus": ENGINE_BUNDLE["CPU"]},
        placement_group_bundles=replica_bundles(layout, resource),
        placement_group_strategy="PACK",
        health_check_period_s=t.health_check_period_s,
        health_check_timeout_s=t.step_s + 5,
        max_ongoing_requests=100_000,       # the engine's scheduler is the queue; Serve only forwards
        # A replica being removed (scaled in, redeployed) gets no new requests and finishes its
        # in-flight ones for up to this long before it is stopped.
        graceful_shutdown_timeout_s=config.router.drain_grace_s,
        max_constructor_retry_count=2,      # a shard that cannot load will not load on the third try either
        request_router_config=RequestRouterConfig(
            request_router_class=CapacityRouter,
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_routing_stats_timeout_s=t.step_s,  # a replica whose loop cannot answer that long is stuck
        ),
    ).bind(config, model_dir, resource)
