"""The router's view of its replicas' health, and what it publishes of it.

Health means serving: a watcher reads every replica's report each half health period; overall
SERVING needs at least one replica that completed a step (or its idle probe) recently and has not
failed (`cluster.runtime.report.replica_problems`, the verdict `caravan doctor` reads too). Each
replica also has its own `grpc.health.v1` service name, `caravan.replica.<name>`, and
`caravan.router` is SERVING as long as the router's server runs (for liveness probes).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2

from cluster.api.backend import Backend
from cluster.api.metrics import RouterMetrics
from cluster.config import TimeoutsSection
from cluster.runtime.report import ReplicaInfo, replica_problems

log = logging.getLogger(__name__)

REPLICA_SERVICE_PREFIX = "caravan.replica."
# SERVING while this router's server runs, whatever its replicas do: what a liveness probe asks
# (restarting the router's host because replicas are rebuilding would only make things worse).
ROUTER_SERVICE = "caravan.router"
INFERENCE_SERVICE = "caravan.v1.Inference"
_STATUS = health_pb2.HealthCheckResponse


@dataclass
class ReplicaView:
    info: ReplicaInfo
    serving: bool
    progress_age_s: float
    error: str


class BoundedHealthServicer(health.aio.HealthServicer):
    """`grpc.health.v1` with a bound on open Watch streams. A Watch needs no token (Kubernetes' probes
    cannot send one) and stays open as long as its client likes, each holding one of the server's
    RPC slots: without a bound, a client that opens enough of them takes every slot, and the probes'
    Check and every authenticated call fail with it. Past the bound a Watch is refused at once;
    Check is never limited."""

    def __init__(self, max_watches: int):
        super().__init__()
        self.max_watches, self.watches = max_watches, 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        if self.watches >= self.max_watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.watches} health watches are open, the most this router keeps; "
                                "poll Check instead, or retry later")
        self.watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watches -= 1


class ReplicaHealth:
    def __init__(self, backend: Backend, timeouts: TimeoutsSection, metrics: RouterMetrics, max_watches: int = 64):
        self.backend, self.timeouts, self.metrics = backend, timeouts, metrics
        self.servicer = BoundedHealthServicer(max_watches)
        self.replicas: list[ReplicaView] = []
        self.serving = False
        self.draining = False
        self.changed = asyncio.Event()  # set while serving (or draining: waiters must look again)

    async def watch(self) -> None:
        """Refreshes forever; the router cancels it when it closes."""
        while True:
            await asyncio.sleep(self.timeouts.health_check_period_s / 2)
            await self.refresh()

    async def refresh(self) -> None:
        """Reads every replica's latest report and publishes the verdicts."""
        try:
            infos = await within(self.backend.infos(), self.timeouts.step_s)
        except Exception as e:  # the registry is unreachable: nothing can be vouched for
            log.warning("cannot read replica reports: %s", e)
            infos = []
        views = []
        for info in infos:
            error = "; ".join(replica_problems(info, self.timeouts))
            views.append(ReplicaView(info, not error, info.age_s, error))
        self.replicas = views
        self.metrics.observe_replicas({v.info.name: (v.serving, v.info.stats) for v in views})
        await self.publish()

    async def publish(self) -> None:
        serving = not self.draining and any(v.serving for v in self.replicas)
        if serving != self.serving:
            log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving
        if serving or self.draining:
            self.changed.set()
        else:
            self.changed.clear()
        self.metrics.serving.set(int(serving))
        overall = _STATUS.SERVING if serving else _STATUS.NOT_SERVING
        await self.servicer.set("", overall)
        await self.servicer.set(INFERENCE_SERVICE, overall)
        for v in self.replicas:
            ok = v.serving and not self.draining
            await self.servicer.set(REPLICA_SERVICE_PREFIX + v.info.name,
                                    _STATUS.SERVING if ok else _STATUS.NOT_SERVING)

    def sequence_kv_tokens(self) -> int | None:
        """The most tokens one sequence can hold on the serving replicas (the smallest KV cache of
        them); None while none has reported it."""
        sizes = [v.info.stats.sequence_kv_tokens for v in self.replicas
                 if v.serving and v.info.stats.sequence_kv_tokens > 0]
        return min(sizes, default=None)

    async def router_up(self) -> None:
        await self.servicer.set(ROUTER_SERVICE, _STATUS.SERVING)


async def within(awaitable, timeout_s: float):
    """`asyncio.wait_for` that never drops a cancel. On Python 3.11 wait_for returns the result when
    the cancel lands as the awaitable completes; the health loop would then run on after close()."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    return task.result()
