"""Who gets in: a bounded number of requests in flight, none while draining, and a bounded wait for a
serving replica while the cluster recovers. Both front doors admit through here."""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from typing import Iterator

import grpc

from cluster.api.health import ReplicaHealth
from cluster.api.metrics import RouterMetrics
from cluster.config import RouterSection


class Refused(Exception):
    """A request the router will not run now (draining, full, nothing serving), with its gRPC code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


DRAINING = "the router is draining; send the request to another router"


class Admission:
    def __init__(self, rc: RouterSection, health: ReplicaHealth, metrics: RouterMetrics):
        self.rc, self.health, self.metrics = rc, health, metrics
        self.in_flight = 0

    @property
    def draining(self) -> bool:
        return self.health.draining

    def check(self) -> None:
        """Refuses at once what would not be admitted now: draining, or the places all taken."""
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, DRAINING)
        if self.in_flight >= self.rc.max_in_flight:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the router's queue is full ({self.in_flight} requests in flight, router.max_in_flight="
                          f"{self.rc.max_in_flight}); retry with backoff")

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Holds one of `router.max_in_flight` places for the request's whole life, or refuses it at
        once (`check`); those waiting for a replica hold theirs, so waiting stays bounded."""
        self.check()
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    async def wait_for_replica(self, time_remaining: float | None) -> None:
        """While no replica serves (one is repairing or being replaced), an admitted request waits
        for one, up to `router.wait_for_replica_s` and within its own deadline (`time_remaining`)."""
        if self.health.serving:
            return
        limit = self.rc.wait_for_replica_s
        wait = limit if time_remaining is None else min(limit, time_remaining)
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.health.changed.wait(), wait)
        except (TimeoutError, asyncio.TimeoutError):
            pass
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, DRAINING)
        if not self.health.serving:
            raise Refused(grpc.StatusCode.UNAVAILABLE, (
                f"no replica is serving: the cluster is recovering (see `caravan status`); waited "
                f"{time.monotonic() - started:.1f} s (router.wait_for_replica_s={limit:g}, or the request's "
                f"deadline); retry shortly"))
        self.metrics.replica_waits.observe(time.monotonic() - started)

    async def settle(self, grace_s: float) -> int:
        """Waits up to `grace_s` for the requests in flight to finish; returns how many did not."""
        deadline = time.monotonic() + grace_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight
