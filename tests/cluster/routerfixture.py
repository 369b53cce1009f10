"""A gRPC router on a thread of its own (its own event loop), for tests that talk to it as clients do."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from caravan.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc


class RouterThread:
    def __init__(self, make_router, timeout_s: float = 60):
        """make_router: a coroutine function run on the router's loop, returning a started Router."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-router")
        self.thread.start()
        try:
            self.router = self.call(make_router(), timeout_s)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self.target = f"127.0.0.1:{self.router.port}"

    def call(self, coro, timeout_s: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def close(self) -> None:
        if not self.router.stopped.is_set():
            self.call(self.router.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Clients:
    """Stubs over one channel, with the admin token at hand."""

    def __init__(self, channel: grpc.Channel, token: str):
        self.channel = channel
        self.inference = inference_pb2_grpc.InferenceStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.auth = (("authorization", f"Bearer {token}"),)

    def status(self):
        return self.admin.Status(admin_pb2.StatusRequest(), metadata=self.auth, timeout=10)

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def wait_health(self, want: int, service: str = "", timeout_s: float = 60) -> float:
        """Seconds until health reports `want`; fails the test past the timeout."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            try:
                if self.health_status(service) == want:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"health of {service!r} did not become {want} within {timeout_s} s "
                             f"(now {self.health_status(service)})")

    def wait_all_blocks_free(self, timeout_s: float) -> float:
        """Seconds until every replica reports all its KV blocks free."""
        start = time.monotonic()
        while True:
            replicas = self.status().replicas
            if replicas and all(r.kv_blocks_free == r.kv_blocks_total for r in replicas):
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"KV blocks still in use after {timeout_s} s: "
                                     f"{[(r.name, r.kv_blocks_free, r.kv_blocks_total) for r in replicas]}")
            time.sleep(0.02)
