"""gRPC plumbing of the router: raw-bytes handlers (so that `validate.parse` can name a field the
protobuf runtime refuses), the mapping of the router's exceptions to status codes, bearer-token
auth, and the files the transport reads (token, TLS key and chain)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health

from caravan.v1 import admin_pb2 as apb
from caravan.v1 import inference_pb2 as pb
from cluster.api.admission import Refused
from cluster.api.metrics import RouterMetrics
from cluster.api.validate import InvalidRequest, parse
from cluster.config import ConfigError, RouterSection
from cluster.tokens import write_secret
from cluster.engine.engine import ReplicaFailed, ReplicaUnavailable
from cluster.engine.request import RequestError
from cluster.runtime.placement import PlacementError

log = logging.getLogger(__name__)

INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"]
ADMIN = apb.DESCRIPTOR.services_by_name["Admin"]
_USER_ERRORS = (InvalidRequest, Refused)


@dataclass(frozen=True)
class Credentials:
    """The router's two tokens: inference clients never hold the admin token, so they cannot drain or
    scale the router."""
    inference: str | None       # what Inference RPCs need (router.auth_token_file); None: they need none
    inference_file: Path | None
    admin: str                  # what Admin RPCs need (router.admin_token_file, or a generated one)
    admin_file: Path


def handlers(service, servicer, metrics: RouterMetrics) -> grpc.GenericRpcHandler:
    """The service's methods on `servicer` (one method per RPC, by name), taking raw bytes."""
    methods = {}
    for m in service.methods:
        request_cls, response_cls = pb_class(m.input_type), pb_class(m.output_type)
        fn, name = getattr(servicer, m.name), f"{service.name}.{m.name}"
        if m.server_streaming:
            methods[m.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(fn, request_cls, name, metrics), response_serializer=response_cls.SerializeToString)
        else:
            methods[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary(fn, request_cls, name, metrics), response_serializer=response_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, methods)


def pb_class(descriptor):
    module = pb if descriptor.file is pb.DESCRIPTOR else apb
    return getattr(module, descriptor.name)


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, _USER_ERRORS):
        return e.code, str(e)
    if isinstance(e, ReplicaUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, ReplicaFailed):
        return grpc.StatusCode.UNAVAILABLE, f"the replica failed: {e}"
    if isinstance(e, PlacementError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, RequestError):  # the replica's own check (Ray wraps it: its cause is the message)
        return grpc.StatusCode.OUT_OF_RANGE, str(getattr(e, "cause", None) or e)
    log.exception("internal error", exc_info=e)
    # The exception's own text may hold anything (paths, tokens, other requests): it stays in the log.
    return grpc.StatusCode.INTERNAL, "internal error in the router; its log has the details"


@asynccontextmanager
async def _outcome(name: str, metrics: RouterMetrics, context: grpc.aio.ServicerContext):
    """Counts the RPC by the code it ends with, and turns the router's exceptions into statuses."""
    try:
        yield
    except asyncio.CancelledError:  # the client cancelled, went away, or its deadline passed
        metrics.requests.labels("grpc", name, _cancel_code(context)).inc()
        raise
    except Exception as e:
        code, message = status_of(e)
        metrics.requests.labels("grpc", name, code.name).inc()
        await context.abort(code, message)
    metrics.requests.labels("grpc", name, "OK").inc()


async def _parse(request_cls, data: bytes):
    try:
        return request_cls.FromString(data)
    except DecodeError:
        # Naming the field that broke walks the whole message in Python (a second for some MiB): not on
        # the event loop, where it would stall every other call, health checks included.
        return await asyncio.to_thread(parse, request_cls, data)


def _unary(fn: Callable[..., Awaitable], request_cls, name: str, metrics: RouterMetrics):
    async def handle(data: bytes, context: grpc.aio.ServicerContext):
        async with _outcome(name, metrics, context):
            return await fn(await _parse(request_cls, data), context)
    return handle


def _streaming(fn: Callable[..., AsyncIterator], request_cls, name: str, metrics: RouterMetrics):
    async def handle(data: bytes, context: grpc.aio.ServicerContext):
        async with _outcome(name, metrics, context):
            async for response in fn(await _parse(request_cls, data), context):
                yield response
    return handle


def _cancel_code(context: grpc.aio.ServicerContext) -> str:
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"


class BearerAuth(grpc.aio.ServerInterceptor):
    """Bearer-token check: Admin always, with the admin token (the inference token is refused there);
    every other service with the inference token when one is configured; the health service never
    (Kubernetes' gRPC probes cannot send headers)."""

    def __init__(self, credentials: Credentials, metrics: RouterMetrics):
        self.credentials, self.metrics = credentials, metrics
        self.admin_prefix = f"/{ADMIN.full_name}/"
        self.health_prefix = f"/{health.SERVICE_NAME}/"

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method, creds = details.method, self.credentials
        handler = await continuation(details)
        if handler is None or method.startswith(self.health_prefix):
            return handler
        sent = _bearer(details.invocation_metadata)
        if method.startswith(self.admin_prefix):
            if _same(sent, creds.admin):
                return handler
            if creds.inference is not None and _same(sent, creds.inference):
                code, message = grpc.StatusCode.PERMISSION_DENIED, (
                    "the inference token cannot call Admin; send the admin token (router.admin_token_file, "
                    f"here {creds.admin_file})")
            else:
                code, message = grpc.StatusCode.UNAUTHENTICATED, (
                    "missing or wrong bearer token: send metadata 'authorization: Bearer <token>' with the admin "
                    f"token (in {creds.admin_file})")
        elif creds.inference is None or _same(sent, creds.inference):
            return handler
        else:
            code, message = grpc.StatusCode.UNAUTHENTICATED, (
                "missing or wrong bearer token: send metadata 'authorization: Bearer <token>' (the token is in "
                f"router.auth_token_file {creds.inference_file})")
        return self._refusal(handler, method, code, message)

    def _refusal(self, handler, method: str, code: grpc.StatusCode, message: str):
        self.metrics.requests.labels("grpc", method.strip("/").replace("/", "."), code.name).inc()

        async def refuse(request, context):
            await context.abort(code, message)

        if handler.response_streaming:
            async def refuse_stream(request, context):
                await refuse(request, context)
                yield  # makes this an async generator, as a streaming handler must be
            return grpc.unary_stream_rpc_method_handler(refuse_stream)
        return grpc.unary_unary_rpc_method_handler(refuse)


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


def _same(sent: str | None, token: str) -> bool:
    return sent is not None and hmac.compare_digest(sent.encode(), token.encode())


def read_pem(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path} ({e.strerror}); point it at a readable PEM file") from None


def load_token(rc: RouterSection, default_file: Path) -> Credentials:
    """The inference token of router.auth_token_file (none: inference is open), and the admin token of
    router.admin_token_file, or else one generated once into `default_file` (mode 0600) for local CLIs."""
    inference = _read_token("router.auth_token_file", rc.auth_token_file)
    if rc.admin_token_file is not None:
        admin_file = Path(rc.admin_token_file)
        admin = _read_token("router.admin_token_file", rc.admin_token_file)
    else:
        admin_file, admin = default_file, write_secret(default_file, secrets.token_urlsafe(32))
    if inference is not None and hmac.compare_digest(inference.encode(), admin.encode()):
        raise ConfigError("router.admin_token_file", "holds the same token as router.auth_token_file; give Admin a "
                                                     "token of its own, or every inference client could drain and "
                                                     "scale the router")
    return Credentials(inference, None if inference is None else Path(rc.auth_token_file), admin, admin_file)


def _read_token(key: str, file: str | None) -> str | None:
    if file is None:
        return None
    path = Path(file)
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path} ({e.strerror}); point it at a readable file holding the "
                               "token") from None
    if not token:
        raise ConfigError(key, f"{path} is empty; write the token into it")
    return token


def load_api_keys(rc: RouterSection, credentials: Credentials) -> tuple[str, ...] | None:
    """The keys the HTTP API takes: router.api_keys_file's lines (blank lines and # comments left out);
    without it, the router's token when router.auth_token_file guards every RPC; else None (open)."""
    if rc.api_keys_file is None:
        return None if credentials.inference is None else (credentials.inference,)
    path = Path(rc.api_keys_file)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError("router.api_keys_file", f"cannot read {path} ({e.strerror}); point it at a readable file "
                                                  "with one API key per line") from None
    keys = tuple(k for k in (line.strip() for line in lines) if k and not k.startswith("#"))
    if not keys:
        raise ConfigError("router.api_keys_file", f"{path} holds no key; write one API key per line")
    return keys
