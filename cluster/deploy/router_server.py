"""The router as a Serve deployment: one, on the Ray head node (on Kubernetes the head pod is where its
Service and probes point), restarted by Serve if it dies or stops serving."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from cluster.api.server import build_router
from cluster.config import ServeConfig
from cluster.deploy.backend import ServeBackend

STOPPED_GRACE_S = 5.0


class RouterServer:
    """The router (gRPC and the OpenAI HTTP API) inside a Serve replica. It runs on its own thread and
    event loop, as it does in a process of its own: its servers and health loop never wait on Serve's
    calls to this actor."""

    def __init__(self, config: ServeConfig, model_dir: str, replicas):
        _log_to_stderr()
        self.config = config
        self._stopped_at: float | None = None
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="caravan-router", daemon=True).start()
        self.router = build_router(config, model_dir, ServeBackend(config, model_dir, handle=replicas))
        self._call(self._start(), timeout_s=config.timeouts.setup_s)

    async def _start(self) -> None:
        """Binds router.port. After a restart the previous router may hold it for a few seconds more
        (it drains first), so a port in use is tried again for a while before it is an error."""
        deadline = time.monotonic() + self.config.router.drain_grace_s + 10
        while True:
            try:
                return await self.router.start()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)

    def _call(self, coro, timeout_s: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _await(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def endpoint(self) -> dict[str, Any]:
        """Where clients reach this router, and the file holding its token (on the head node)."""
        rc = self.config.router
        return {"host": rc.host, "port": self.router.port, "http_port": self.router.http_port,
                "metrics_port": self.router.metrics_port, "tls_cert_file": rc.tls_cert_file,
                "token_file": self.router.token_file and str(self.router.token_file)}

    def serving(self) -> bool:
        return self.router.serving

    async def drain(self, grace_s: float | None = None) -> int:
        """Refuses new requests and finishes in-flight ones (up to the grace), then stops the server.
        Returns how many were in flight. Serve then replaces this replica (`check_health` fails)."""
        in_flight = self.router.in_flight
        await self._await(self.router.drain(grace_s))
        return in_flight

    async def wait_stopped(self, timeout_s: float) -> bool:
        """True once the router has stopped (drained); False after `timeout_s` (callers poll)."""
        async def wait() -> bool:
            try:
                await asyncio.wait_for(self.router.stopped.wait(), timeout_s)
                return True
            except TimeoutError:
                return False
        return await self._await(wait())

    def check_health(self) -> None:
        """A drained router is replaced, but not at once: whoever drained it (`caravan serve`, waiting
        in `wait_stopped`) hears that it stopped first."""
        if self.router.stopped.is_set():
            self._stopped_at = self._stopped_at or time.monotonic()
            if time.monotonic() - self._stopped_at > STOPPED_GRACE_S:
                raise RuntimeError("the router has stopped (drained); Serve starts a new one")

    async def __del__(self):
        """Serve stops this replica (the application is deleted or redeployed): drain first."""
        if not hasattr(self, "router"):  # the constructor failed
            return
        if not self.router.stopped.is_set():
            await self._await(self.router.drain())
        self._loop.call_soon_threadsafe(self._loop.stop)


def _log_to_stderr() -> None:
    """Serve configures its own logger only; Caravan's INFO lines (health changes, draining) go to the
    replica's stderr, which Ray keeps in its logs and forwards to the driver."""
    logger = logging.getLogger("cluster")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
