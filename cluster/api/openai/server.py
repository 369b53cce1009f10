"""The HTTP server of the OpenAI API: uvicorn, run as a task on the router's own event loop.

On the router's loop rather than in a process or thread of its own (or behind Ray Serve's HTTP
proxy) because the HTTP door must share the router's state, not a copy of it: one admission count
against `router.max_in_flight`, one health verdict, one drain, one set of metrics, and requests
handed to the same `Inference` and backend (cache-aware routing, waiting through a repair) with no
hop between loops. uvicorn and Starlette are the ecosystem's ASGI stack: HTTP/1.1 keep-alive and
parsing, TLS and flow control are theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from starlette.applications import Starlette

from cluster.config import RouterSection

log = logging.getLogger(__name__)
SHUTDOWN_S = 2  # after a drain nothing should be left; whatever is still open gets this long


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process that hosts the router (caravan serve, a Serve
    replica, a test) owns SIGINT and SIGTERM, and a drain stops this server."""

    def capture_signals(self):
        return contextlib.nullcontext()


class HTTPServer:
    def __init__(self, app: Starlette, rc: RouterSection):
        self.app, self.rc = app, rc
        self.port = 0
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    def listen(self) -> int:
        """Binds router.host:router.http_port (before anything else of the router starts, so that a port
        in use fails the start cleanly); returns the port."""
        self._sock = _listen(self.rc.host, self.rc.http_port)
        self.port = self._sock.getsockname()[1]
        return self.port

    async def serve(self) -> None:
        """Starts answering on the bound socket; returns once uvicorn is up."""
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_S, ssl_certfile=self.rc.tls_cert_file,
                                ssl_keyfile=self.rc.tls_key_file)
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]),
                                                            name="caravan-http")
        while not self._server.started:
            if self._task.done():  # it failed to start (a bad TLS file): say why here
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()


def _listen(host: str, port: int) -> socket.socket:
    host = host.strip("[]")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise OSError(f"router.http_port: cannot listen on {host}:{port} ({e.strerror or e}); pick another port, "
                      "or 0 to turn the HTTP API off") from None
    sock.setblocking(False)
    return sock
