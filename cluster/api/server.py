"""The router: the public front door of a Caravan deployment, and its lifecycle.

One asyncio process serves caravan.v1 `Inference` (`cluster.api.inference`) and `Admin`
(`cluster.api.admin`), the standard `grpc.health.v1` service (`cluster.api.health`) and server
reflection, over one gRPC server (`cluster.api.transport`: auth, TLS, error codes), and the
OpenAI-compatible HTTP API (`cluster.api.openai`) on `router.http_port`, from the same event loop. Requests are
admitted or refused at once (`cluster.api.admission`); a drain stops admitting, lets the requests
in flight finish within a grace period, and stops the server. The replicas sit behind a `Backend`
(`cluster.api.backend`): Ray Serve in production, an in-process engine in tests.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.api.admin import Admin
from cluster.api.admission import Admission
from cluster.api.backend import Backend
from cluster.api.health import ReplicaHealth
from cluster.api.inference import Inference
from cluster.api.metrics import RouterMetrics
from cluster.api.openai.app import OpenAIApp
from cluster.api.openai.server import HTTPServer
from cluster.api.tokenizer import Tokenizer
from cluster.api.transport import (ADMIN, INFERENCE, BearerAuth, Credentials, handlers, load_api_keys, load_token,
                                   read_pem)
from cluster.api.validate import Limits
from cluster.config import ServeConfig
from cluster.tokens import admin_token_file
from shard.config import ModelConfig

log = logging.getLogger(__name__)

# Connection limits, so that no client holds the server's resources for free: dead peers are found by
# keepalive pings and closed; idle connections close after 15 minutes; a connection is asked to go
# away after an hour (its streams get another hour to finish: a long generation is not cut); a client
# may not ping more than every 10 s without data. The streams of a connection are bounded by the
# server's RPC cap and by admission, not by HTTP/2's per-connection limit: past that limit a stream is
# reset (UNAVAILABLE) where a client over its share should hear RESOURCE_EXHAUSTED from admission.
TRANSPORT_LIMITS = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_connection_idle_ms", 15 * 60_000),
    ("grpc.max_connection_age_ms", 60 * 60_000),
    ("grpc.max_connection_age_grace_ms", 60 * 60_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
)


def max_rpcs(rc) -> int:
    return 4 * rc.max_in_flight + 64


def max_watches(rc) -> int:
    """Health watches kept open: an eighth of the RPC slots, so that watches can never take them all."""
    return max(1, max_rpcs(rc) // 8)


class Router:
    def __init__(self, config: ServeConfig, tokenizer: Tokenizer, limits: Limits, backend: Backend, *,
                 model_name: str, credentials: Credentials):
        self.config, self.rc, self.backend, self.credentials = config, config.router, backend, credentials
        self.limits = limits
        self.metrics = RouterMetrics()
        self.health = ReplicaHealth(backend, config.timeouts, self.metrics, max_watches(self.rc))
        self.admission = Admission(self.rc, self.health, self.metrics)
        self.inference = Inference(config, tokenizer, limits, backend, self.admission, self.metrics, model_name)
        self.admin = Admin(backend, self.health, self.admission, self.drain)
        self.openai = OpenAIApp(self.inference, self.admission, self.health, self.metrics,
                                load_api_keys(self.rc, credentials), self.rc.max_message_bytes)
        self._http: HTTPServer | None = None
        self.http_port: int | None = None  # None while the HTTP API is off (router.http_port: 0)
        self.stopped = asyncio.Event()
        self._watch_task: asyncio.Task | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None

    @property
    def serving(self) -> bool:
        return self.health.serving

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    @property
    def token_file(self) -> Path | None:
        """The inference token's file; None when inference needs no token."""
        return self.credentials.inference_file

    async def start(self) -> None:
        server = grpc.aio.server(
            interceptors=[BearerAuth(self.credentials, self.metrics)],
            options=[("grpc.max_receive_message_length", self.rc.max_message_bytes),
                     ("grpc.max_send_message_length", self.rc.max_message_bytes),
                     ("grpc.so_reuseport", 0), *TRANSPORT_LIMITS],
            # A hard ceiling on calls in progress, well above admission: the queue refuses first, with
            # a clearer message; this bounds the handlers of unary calls and refused requests too.
            maximum_concurrent_rpcs=max_rpcs(self.rc))
        server.add_generic_rpc_handlers((handlers(INFERENCE, self.inference, self.metrics),
                                         handlers(ADMIN, self.admin, self.metrics)))
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection(
            (INFERENCE.full_name, ADMIN.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        if self.rc.http_port:
            self._http = HTTPServer(self.openai.starlette(), self.rc)
            self.http_port = self._http.listen()
        try:
            self.port = self._listen(server)
        except OSError:
            if self._http is not None:
                await self._http.stop()
            raise
        await server.start()
        self._server = server
        await self.health.router_up()
        await self.health.refresh()
        self._watch_task = asyncio.get_running_loop().create_task(self.health.watch(), name="caravan-health")
        if self._http is not None:
            await self._http.serve()
        if self.rc.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.rc.host, self.rc.metrics_port)
        log.info("router on %s:%d (%s), OpenAI HTTP API %s, metrics %s", self.rc.host, self.port,
                 "TLS" if self.rc.tls_cert_file else "plaintext",
                 f"on :{self.http_port}/v1" if self.http_port else "off",
                 f"on :{self.metrics_port}/metrics" if self.metrics_port else "off")

    def _listen(self, server: grpc.aio.Server) -> int:
        address = f"{self.rc.host}:{self.rc.port}"
        if self.rc.tls_cert_file is not None:
            creds = grpc.ssl_server_credentials([(read_pem("router.tls_key_file", self.rc.tls_key_file),
                                                  read_pem("router.tls_cert_file", self.rc.tls_cert_file))])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"router.port: cannot listen on {address} (in use?); pick another port or 0 for any")
        return port

    async def drain(self, grace_s: float | None = None) -> None:
        """Stops admitting, gives in-flight requests `grace_s` to finish, then stops the server.
        `stopped` is set when done."""
        if self.health.draining:
            return
        self.health.draining = True
        await self.health.publish()
        grace = self.rc.drain_grace_s if grace_s is None else grace_s
        log.info("draining: %d request(s) in flight, %.0f s grace", self.in_flight, grace)
        if left := await self.admission.settle(grace):
            log.warning("drain grace period over; cutting off %d request(s)", left)
        await self.close()

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._http is not None:
            await self._http.stop()
        if self._server is not None:
            await self._server.stop(grace=0.5)
        await self.backend.close()
        self.stopped.set()


def build_router(config: ServeConfig, model_dir: str, backend: Backend, *,
                 default_token_file: Path | None = None) -> Router:
    """A router for the checkpoint in `model_dir`, its limits taken from the model's own config."""
    model = ModelConfig.from_pretrained(model_dir)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    limits = Limits(model.max_position_embeddings, model.vocab_size, tokenizer.has_chat_template)
    credentials = load_token(config.router, default_token_file or admin_token_file())
    return Router(config, tokenizer, limits, backend, model_name=Path(model_dir).name, credentials=credentials)
