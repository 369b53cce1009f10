"""The Admin service: Status, Scale and Drain, for operators (`caravan status | scale | drain`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from caravan.v1 import admin_pb2 as apb
from cluster.api.admission import Admission
from cluster.api.backend import Backend
from cluster.api.health import ReplicaHealth
from cluster.api.validate import invalid

log = logging.getLogger(__name__)


class Admin:
    def __init__(self, backend: Backend, health: ReplicaHealth, admission: Admission,
                 drain: Callable[[float | None], Awaitable[None]]):
        self.backend, self.health, self.admission, self._drain = backend, health, admission, drain
        self._tasks: set[asyncio.Task] = set()

    async def Status(self, req: apb.StatusRequest, context) -> apb.StatusResponse:
        await self.health.refresh()  # the replicas' latest reports, not the watcher's last look
        out = apb.StatusResponse(serving=self.health.serving, draining=self.admission.draining,
                                 in_flight=self.admission.in_flight, max_in_flight=self.admission.rc.max_in_flight,
                                 replicas_target=await self.backend.target_replicas(),
                                 pending=await self.backend.pending(len(self.health.replicas)))
        for v in self.health.replicas:
            info, s = v.info, v.info.stats
            r = out.replicas.add(
                name=info.name, state=apb.REPLICA_STATE_SERVING if v.serving else apb.REPLICA_STATE_NOT_SERVING,
                kv_blocks_total=s.num_blocks, kv_blocks_free=s.free_blocks, running=s.running, waiting=s.waiting,
                steps=s.steps, preemptions=s.preemptions, last_progress_age_s=v.progress_age_s, error=v.error,
                prefix_cache_blocks=s.prefix_cached_blocks, prefix_cache_requests=s.prefix_requests,
                prefix_cache_hit_requests=s.prefix_hit_requests, prefix_cache_prompt_tokens=s.prefix_prompt_tokens,
                prefix_cache_hit_tokens=s.prefix_hit_tokens, prefix_cache_evictions=s.prefix_evictions)
            for place, ok in zip(info.shards, info.shard_healthy):
                r.shards.add(rank=place.rank, stage=place.stage, tp_rank=place.tp_rank, node_id=place.node_id,
                             node_ip=place.ip, healthy=ok)
        return out

    async def Scale(self, req: apb.ScaleRequest, context) -> apb.ScaleResponse:
        if req.replicas < 1:
            raise invalid("replicas", f"{req.replicas} is out of range; use at least 1")
        before = await self.backend.scale(req.replicas)
        log.info("scale: %d -> %d replica(s)", before, req.replicas)
        return apb.ScaleResponse(replicas_before=before, replicas_target=req.replicas)

    async def Drain(self, req: apb.DrainRequest, context) -> apb.DrainResponse:
        grace = req.grace_period_s
        if not (grace == grace and 0 <= grace < 86400):
            raise invalid("grace_period_s", f"{grace} is out of range; use 0 (the configured grace) to 86400 seconds")
        in_flight = self.admission.in_flight
        task = asyncio.get_running_loop().create_task(self._drain(grace or None), name="caravan-drain")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return apb.DrainResponse(in_flight=in_flight)
