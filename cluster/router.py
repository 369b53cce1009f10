"""The gRPC router: the public front door of a Caravan deployment.

One asyncio process serves caravan.v1 `Inference` and `Admin`, the standard `grpc.health.v1`
service and server reflection. For each Generate call it validates every field (nothing is queued
for a bad request), admits the request or refuses it at once when `router.max_in_flight` requests
are already in flight, tokenizes (the model's own chat template for chat input), hands the ids to
a replica (the backend picks the one with the most free capacity) and streams text back as the
replica samples tokens. A call that is cancelled, disconnects or passes its deadline leaves the
stream, which aborts the sequence on its replica.

Health means serving: a watcher reads every replica's report each health period; overall SERVING
needs at least one replica that completed a step (or its idle probe) recently and has not failed.
Each replica also has its own health service name, `caravan.replica.<name>`, and `caravan.router` is
SERVING as long as the router's server runs (for liveness probes).

The replicas themselves sit behind a `Backend`: Ray Serve in production (`cluster/backends.py`),
an in-process engine in tests.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from caravan.v1 import admin_pb2 as apb
from caravan.v1 import inference_pb2 as pb
from cluster.config import ConfigError, RouterSection, ServeConfig, admin_token_file
from cluster.engine import ReplicaFailed, ReplicaUnavailable
from cluster.metrics import RouterMetrics
from cluster.placement import PlacementError
from cluster.scheduler import TokenUpdate
from cluster.textstream import TextStream
from cluster.tokenizer import Tokenizer
from cluster.validate import (InvalidRequest, Limits, check_chat, check_generate, check_prompt_length, check_text,
                              check_token_ids, invalid, parse)
from shard.sampler import SamplingParams

log = logging.getLogger(__name__)

INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"]
ADMIN = apb.DESCRIPTOR.services_by_name["Admin"]
REPLICA_SERVICE_PREFIX = "caravan.replica."
# SERVING while this router's server runs, whatever its replicas do: what a liveness probe asks
# (restarting the router's host because replicas are rebuilding would only make things worse).
ROUTER_SERVICE = "caravan.router"
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


class Backend(Protocol):
    """The replicas, as the router sees them."""

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenUpdate]: ...

    async def infos(self) -> list: ...             # cluster.serve.ReplicaInfo, one per live replica

    async def scale(self, replicas: int) -> int: ...  # returns the previous target

    async def target_replicas(self) -> int: ...

    async def pending(self, reporting: int) -> str: ...  # why fewer than the target report; "" when none are missing

    async def close(self) -> None: ...               # the router is done with it


class Refused(Exception):
    """A request the router will not run now (draining, full, nothing serving), with its gRPC code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class ReplicaView:
    info: object           # cluster.serve.ReplicaInfo
    serving: bool
    progress_age_s: float
    error: str


class Router:
    def __init__(self, config: ServeConfig, tokenizer: Tokenizer, limits: Limits, backend: Backend, *,
                 model_name: str, admin_token: str, token_for_all: bool, token_file: Path):
        self.config, self.rc = config, config.router
        self.tokenizer, self.limits, self.backend = tokenizer, limits, backend
        self.model_name = model_name
        self.admin_token, self.token_for_all, self.token_file = admin_token, token_for_all, token_file
        self.metrics = RouterMetrics()
        self.health = health.aio.HealthServicer()
        self.replicas: list[ReplicaView] = []
        self.serving = False
        self._serving_event = asyncio.Event()  # set while serving (or draining: waiters must look again)
        self.draining = False
        self.in_flight = 0
        self.stopped = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._ids = itertools.count(1)
        self._watch_task: asyncio.Task | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None

    # ---- lifecycle ----

    async def start(self) -> None:
        server = grpc.aio.server(
            interceptors=[_Auth(self)],
            options=[("grpc.max_receive_message_length", self.rc.max_message_bytes),
                     ("grpc.max_send_message_length", self.rc.max_message_bytes),
                     ("grpc.so_reuseport", 0)],
            # A hard ceiling on calls in progress, well above admission: the queue refuses first, with
            # a clearer message; this bounds the handlers of unary calls and refused requests too.
            maximum_concurrent_rpcs=4 * self.rc.max_in_flight + 64)
        server.add_generic_rpc_handlers((_handlers(INFERENCE, self), _handlers(ADMIN, self)))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (INFERENCE.full_name, ADMIN.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.rc.host}:{self.rc.port}"
        if self.rc.tls_cert_file is not None:
            creds = grpc.ssl_server_credentials([(_read("router.tls_key_file", self.rc.tls_key_file),
                                                  _read("router.tls_cert_file", self.rc.tls_cert_file))])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"router.port: cannot listen on {address} (in use?); pick another port or 0 for any")
        await server.start()
        self._server = server
        await self.health.set(ROUTER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._refresh()
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="caravan-health")
        if self.rc.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.rc.host, self.rc.metrics_port)
        log.info("router on %s:%d (%s), metrics %s", self.rc.host, self.port,
                 "TLS" if self.rc.tls_cert_file else "plaintext",
                 f"on :{self.metrics_port}/metrics" if self.metrics_port else "off")

    async def drain(self, grace_s: float | None = None) -> None:
        """Stops admitting, gives in-flight requests `grace_s` to finish, then stops the server.
        `stopped` is set when done."""
        if self.draining:
            return
        self.draining = True
        self._serving_event.set()
        await self._publish_health()
        grace = self.rc.drain_grace_s if grace_s is None else grace_s
        log.info("draining: %d request(s) in flight, %.0f s grace", self.in_flight, grace)
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("drain grace period over; cutting off %d request(s)", self.in_flight)
        await self.close()

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace=0.5)
        await self.backend.close()
        self.stopped.set()

    # ---- health ----

    async def _watch(self) -> None:
        period = self.config.timeouts.health_check_period_s
        while True:
            await asyncio.sleep(period / 2)
            await self._refresh()

    async def _refresh(self) -> None:
        t = self.config.timeouts
        # A busy replica completes a step at least every step_s; an idle one is probed each period.
        limit = t.step_s + 2 * t.health_check_period_s
        try:
            infos = await _within(self.backend.infos(), t.step_s)
        except Exception as e:  # the registry is unreachable: nothing can be vouched for
            log.warning("cannot read replica reports: %s", e)
            infos = []
        views = []
        for info in infos:
            age = info.progress_age_s + info.report_age_s
            error = info.stats.failed or ("" if age <= limit else f"no progress for {age:.1f} s")
            views.append(ReplicaView(info, not error, age, error))
        self.replicas = views
        self.metrics.observe_replicas({v.info.name: (v.serving, v.info.stats) for v in views})
        await self._publish_health()

    async def _publish_health(self) -> None:
        serving = not self.draining and any(v.serving for v in self.replicas)
        if serving != self.serving:
            log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving
        if serving or self.draining:
            self._serving_event.set()
        else:
            self._serving_event.clear()
        self.metrics.serving.set(int(serving))
        status = health_pb2.HealthCheckResponse
        await self.health.set("", status.SERVING if serving else status.NOT_SERVING)
        await self.health.set(INFERENCE.full_name, status.SERVING if serving else status.NOT_SERVING)
        for v in self.replicas:
            ok = v.serving and not self.draining
            await self.health.set(REPLICA_SERVICE_PREFIX + v.info.name, status.SERVING if ok else status.NOT_SERVING)

    # ---- Inference ----

    async def Generate(self, req: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        received = time.monotonic()
        gen = check_generate(req, self.limits)
        self._admit()
        request_id = f"req-{next(self._ids)}"
        self.metrics.queue_depth.inc()
        first_sent: float | None = None
        try:
            prompt_ids = await self._prompt_ids(req)
            params = check_prompt_length(gen, len(prompt_ids), self.limits)
            await self._wait_for_replica(context)
            self.metrics.prompt_tokens.inc(len(prompt_ids))
            text = TextStream(self.tokenizer, gen.stop)
            ids, logprobs, produced, finish = [], [], 0, None
            first = pb.GenerateResponse(request_id=request_id,
                                        prompt_token_ids=prompt_ids if gen.echo_prompt_ids else ())
            # Closed however the handler leaves (finished, stop string, cancelled, deadline): closing the
            # replica's stream aborts the sequence there, freeing its KV blocks at the next step.
            async with aclosing(self.backend.generate(prompt_ids, params)) as updates:
                async for update in updates:
                    produced += 1
                    ids.append(update.sample.token_id)
                    if params.logprobs is not None:
                        logprobs.append(_logprob(update))
                    delta = text.push(update.sample.token_id)
                    finish = "stop" if text.stopped else update.finish_reason
                    if finish is not None:
                        delta += "" if text.stopped else text.finish()
                    if not delta and finish is None:
                        continue  # an incomplete character: its ids go out with the next text
                    if first_sent is None:
                        first_sent = time.monotonic()
                        self._first_token(first_sent - received)
                    response = first if first is not None else pb.GenerateResponse()
                    first = None
                    response.text, response.token_ids[:] = delta, ids
                    response.logprobs.extend(logprobs)
                    self.metrics.add_generated(len(ids))
                    ids, logprobs = [], []
                    if finish is not None:
                        done = time.monotonic()
                        response.finish_reason = _FINISH[finish]
                        response.usage.CopyFrom(pb.Usage(
                            prompt_tokens=len(prompt_ids), completion_tokens=produced,
                            time_to_first_token_s=first_sent - received, total_time_s=done - received))
                        if produced > 1:
                            self.metrics.tpot.observe((done - first_sent) / (produced - 1))
                    yield response
                    if finish is not None:
                        return  # leaving the stream early (a stop string) aborts the sequence
        finally:
            if first_sent is None:
                self.metrics.queue_depth.dec()
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    def _admit(self) -> None:
        """Admits a request, or refuses it at once: draining, or `router.max_in_flight` requests
        already in (those waiting for a replica included, so waiting stays bounded)."""
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the router is draining; send the request to another router")
        if self.in_flight >= self.rc.max_in_flight:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the router's queue is full ({self.in_flight} requests in flight, router.max_in_flight="
                          f"{self.rc.max_in_flight}); retry with backoff")
        self.in_flight += 1
        self.metrics.in_flight.inc()

    async def _wait_for_replica(self, context) -> None:
        """While no replica serves (one is repairing or being replaced), an admitted request waits
        for one, up to `router.wait_for_replica_s` and within its own deadline."""
        if self.serving:
            return
        remaining = context.time_remaining() if context is not None else None
        wait = self.rc.wait_for_replica_s if remaining is None else min(self.rc.wait_for_replica_s, remaining)
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._serving_event.wait(), wait)
        except (TimeoutError, asyncio.TimeoutError):
            pass
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the router is draining; send the request to another router")
        if not self.serving:
            raise Refused(grpc.StatusCode.UNAVAILABLE, (
                f"no replica is serving: the cluster is recovering (see `caravan status`); waited "
                f"{time.monotonic() - started:.1f} s (router.wait_for_replica_s={self.rc.wait_for_replica_s:g}, or the "
                f"request's deadline); retry shortly"))
        self.metrics.replica_waits.observe(time.monotonic() - started)

    def _first_token(self, ttft: float) -> None:
        self.metrics.queue_depth.dec()
        self.metrics.ttft.observe(ttft)

    async def _prompt_ids(self, req: pb.GenerateRequest) -> list[int]:
        which = req.WhichOneof("input")
        if which == "token_ids":
            return list(req.token_ids.ids)
        if which == "prompt":
            return await asyncio.to_thread(self.tokenizer.encode, req.prompt)
        return await self._chat_ids(req.chat, "chat")

    async def _chat_ids(self, chat: pb.Chat, field: str) -> list[int]:
        messages = check_chat(chat, self.limits, field)
        try:
            return await asyncio.to_thread(self.tokenizer.apply_chat_template, messages)
        except Exception as e:  # the template's own rules (alternating roles, a system turn first, ...)
            raise invalid(f"{field}.messages", f"the model's chat template refused them: {e}") from None

    async def Tokenize(self, req: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        which = req.WhichOneof("input")
        if which is None:
            raise invalid("input", "is missing; set one of text or chat")
        if which == "text":
            check_text(req.text, "text", self.limits)
            ids = await asyncio.to_thread(self.tokenizer.encode, req.text)
        else:
            ids = await self._chat_ids(req.chat, "chat")
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, req: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        ids = check_token_ids(req.token_ids, "token_ids", self.limits, allow_empty=True)
        return pb.DetokenizeResponse(text=self.tokenizer.decode(ids, req.skip_special_tokens))

    async def ModelInfo(self, req: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        layout = self.config.layout
        return pb.ModelInfoResponse(
            model=self.model_name, context_length=self.limits.context_length, vocab_size=self.limits.vocab_size,
            tensor_parallel=layout.tp, pipeline_parallel=layout.pp, replicas=len(self.replicas),
            dtype=self.config.model.dtype, eos_token_ids=sorted(self.tokenizer.eos_token_ids),
            chat_template=self.limits.has_chat_template)

    # ---- Admin ----

    async def Status(self, req: apb.StatusRequest, context) -> apb.StatusResponse:
        await self._refresh()  # the replicas' latest reports, not the watcher's last look
        out = apb.StatusResponse(serving=self.serving, draining=self.draining, in_flight=self.in_flight,
                                 max_in_flight=self.rc.max_in_flight,
                                 replicas_target=await self.backend.target_replicas(),
                                 pending=await self.backend.pending(len(self.replicas)))
        for v in self.replicas:
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
        in_flight = self.in_flight
        task = asyncio.get_running_loop().create_task(self.drain(grace or None), name="caravan-drain")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return apb.DrainResponse(in_flight=in_flight)


def _logprob(update: TokenUpdate) -> pb.TokenLogprob:
    s = update.sample
    return pb.TokenLogprob(token_id=s.token_id, logprob=s.logprob or 0.0,
                           top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in s.top_logprobs or ()])


# ---- gRPC plumbing: raw-bytes handlers, error mapping, auth ----

_USER_ERRORS = (InvalidRequest, Refused)


def _handlers(service, router: Router) -> grpc.GenericRpcHandler:
    """Handlers that take raw bytes, so that `validate.parse` can name an unparsable field."""
    methods = {}
    for m in service.methods:
        request_cls = pb_class(m.input_type)
        response_cls = pb_class(m.output_type)
        fn = getattr(router, m.name)
        name = f"{service.name}.{m.name}"
        if m.server_streaming:
            methods[m.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(fn, request_cls, name, router.metrics), response_serializer=response_cls.SerializeToString)
        else:
            methods[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary(fn, request_cls, name, router.metrics), response_serializer=response_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, methods)


def pb_class(descriptor):
    module = pb if descriptor.file is pb.DESCRIPTOR else apb
    return getattr(module, descriptor.name)


def _status(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, _USER_ERRORS):
        return e.code, str(e)
    if isinstance(e, ReplicaUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, ReplicaFailed):
        return grpc.StatusCode.UNAVAILABLE, f"the replica failed: {e}"
    if isinstance(e, PlacementError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    log.exception("internal error", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"


@asynccontextmanager
async def _outcome(name: str, metrics: RouterMetrics, context: grpc.aio.ServicerContext):
    """Counts the RPC by the code it ends with, and turns the router's exceptions into statuses."""
    try:
        yield
    except asyncio.CancelledError:  # the client cancelled, went away, or its deadline passed
        metrics.requests.labels(name, _cancel_code(context)).inc()
        raise
    except Exception as e:
        code, message = _status(e)
        metrics.requests.labels(name, code.name).inc()
        await context.abort(code, message)
    metrics.requests.labels(name, "OK").inc()


def _unary(fn: Callable[..., Awaitable], request_cls, name: str, metrics: RouterMetrics):
    async def handle(data: bytes, context: grpc.aio.ServicerContext):
        async with _outcome(name, metrics, context):
            return await fn(parse(request_cls, data), context)
    return handle


def _streaming(fn: Callable[..., AsyncIterator], request_cls, name: str, metrics: RouterMetrics):
    async def handle(data: bytes, context: grpc.aio.ServicerContext):
        async with _outcome(name, metrics, context):
            async for response in fn(parse(request_cls, data), context):
                yield response
    return handle


def _cancel_code(context: grpc.aio.ServicerContext) -> str:
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"


class _Auth(grpc.aio.ServerInterceptor):
    """Bearer-token check: Admin always, every other service when a token is configured; the health
    service never (Kubernetes' gRPC probes cannot send headers)."""

    def __init__(self, router: Router):
        self.router = router
        self.admin_prefix = f"/{ADMIN.full_name}/"
        self.health_prefix = f"/{health.SERVICE_NAME}/"

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        needs = method.startswith(self.admin_prefix) or (
            self.router.token_for_all and not method.startswith(self.health_prefix))
        handler = await continuation(details)
        if not needs or handler is None or self._authorized(details.invocation_metadata):
            return handler
        source = ("router.auth_token_file " if self.router.token_for_all else "") + str(self.router.token_file)
        message = ("missing or wrong bearer token: send metadata 'authorization: Bearer <token>' "
                   f"(the token is in {source})")
        self.router.metrics.requests.labels(method.strip("/").replace("/", "."), "UNAUTHENTICATED").inc()

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler.response_streaming:
            async def refuse_stream(request, context):
                await refuse(request, context)
                yield  # makes this an async generator, as a streaming handler must be
            return grpc.unary_stream_rpc_method_handler(refuse_stream)
        return grpc.unary_unary_rpc_method_handler(refuse)

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                return hmac.compare_digest(value[len("Bearer "):].encode(), self.router.admin_token.encode())
        return False


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path} ({e.strerror}); point it at a readable PEM file") from None


def load_token(rc: RouterSection, default_file: Path) -> tuple[str, bool, Path]:
    """(token, whether every RPC needs it, its file). A configured token file guards everything;
    without one, Admin RPCs still need a token, generated once into `default_file` (mode 0600) for
    local CLIs."""
    if rc.auth_token_file is not None:
        path = Path(rc.auth_token_file)
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise ConfigError("router.auth_token_file", f"cannot read {path} ({e.strerror}); point it at a "
                                                        "readable file holding the token") from None
        if not token:
            raise ConfigError("router.auth_token_file", f"{path} is empty; write the token into it")
        return token, True, path
    if not default_file.exists() or not default_file.read_text().strip():
        default_file.parent.mkdir(parents=True, exist_ok=True)
        default_file.touch(mode=0o600)
        default_file.write_text(secrets.token_urlsafe(32))
    return default_file.read_text().strip(), False, default_file


def build_router(config: ServeConfig, model_dir: str, backend: Backend, *,
                 default_token_file: Path | None = None) -> Router:
    """A router for the checkpoint in `model_dir`, its limits taken from the model's own config."""
    from shard.config import ModelConfig
    model = ModelConfig.from_pretrained(model_dir)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    limits = Limits(model.max_position_embeddings, model.vocab_size, tokenizer.has_chat_template)
    token, for_all, token_file = load_token(config.router, default_token_file or admin_token_file())
    return Router(config, tokenizer, limits, backend, model_name=Path(model_dir).name, admin_token=token,
                  token_for_all=for_all, token_file=token_file)


async def _within(awaitable, timeout_s: float):
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
