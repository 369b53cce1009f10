"""The routes of the OpenAI-compatible API, as a Starlette app over the router's own pieces.

A completion request goes the way a gRPC Generate does: its body becomes caravan.v1 requests
(`requests.parse`), `check_generate` checks them, `Admission.admitted` holds one place per choice
(prompts x n) for the request's whole life, `Inference.prepare` tokenizes (chat template included)
and settles max_tokens, and `Inference.stream` runs each choice. A streamed answer's headers go out
with its first token, so that anything refused before it (the queue full, no replica serving) is
an HTTP status the client and its retry logic understand; a failure after it is a last `error` event.
"""

from __future__ import annotations

import hmac
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cluster.api.admission import Admission
from cluster.api.health import INFERENCE_SERVICE, ROUTER_SERVICE, ReplicaHealth
from cluster.api.inference import Chunk, Inference
from cluster.api.metrics import RouterMetrics
from cluster.api.openai.errors import APIError, api_error, bad_field, unauthorized, unknown_model
from cluster.api.openai.requests import Parsed, Prompt, parse
from cluster.api.openai.responses import DONE, Answer, Shapes, event, usage
from cluster.api.openai.streams import ClientGone, EventStream, merge, unless_disconnected
from cluster.api.openai.structured import with_tool_calls
from cluster.api.validate import Generation, InvalidRequest, check_generate
from shard.sampler import SamplingParams

CLIENT_CLOSED = 499  # what the request counter says of a client that left before its answer (nginx's code)


@dataclass
class Run:
    """A checked, admitted and tokenized request: one prompt's ids and parameters per prompt."""
    parsed: Parsed
    prompts: list[tuple[list[int], SamplingParams, Generation]]
    received: float


class OpenAIApp:
    def __init__(self, inference: Inference, admission: Admission, health: ReplicaHealth, metrics: RouterMetrics,
                 api_keys: tuple[str, ...] | None, max_body_bytes: int):
        self.inference, self.admission, self.health, self.metrics = inference, admission, health, metrics
        self.keys = None if api_keys is None else tuple(k.encode() for k in api_keys)
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    def starlette(self) -> Starlette:
        routes = [Route("/health", self.health_check, methods=["GET"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})

    async def health_check(self, request: Request) -> Response:
        """200 while caravan.v1.Inference is SERVING (a replica makes progress); 503 otherwise. As in
        grpc.health.v1, `?service=caravan.router` asks whether the router runs, whatever its replicas do:
        the liveness question, for probes that cannot speak gRPC (the kubelet's, over TLS)."""
        service = request.query_params.get("service", "")
        if service == ROUTER_SERVICE:
            return JSONResponse({"status": "serving"})
        if service not in ("", INFERENCE_SERVICE):
            return JSONResponse({"status": f"unknown service {service!r}"}, status_code=404)
        if self.health.serving:
            return JSONResponse({"status": "serving"})
        return JSONResponse({"status": "draining" if self.health.draining else "not serving"}, status_code=503)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except APIError as e:
            return self._refuse("models", e)
        self._count("models", 200)
        name = self.inference.model_name
        return JSONResponse({"object": "list", "data": [{
            "id": name, "object": "model", "created": self.created, "owned_by": "caravan", "root": name,
            "max_model_len": self.inference.limits.context_length}]})

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "completions")

    async def _complete(self, request: Request, kind: str) -> Response:
        received, method = time.monotonic(), "chat.completions" if kind == "chat" else "completions"
        places = ExitStack()
        try:
            self._authorize(request)
            parsed = parse(await self._json(request), kind)
            if parsed.model != self.inference.model_name:
                raise unknown_model(parsed.model, self.inference.model_name)
            checked = [(p, _checked(parsed, p, lambda p=p: check_generate(p.request, self.inference.limits)))
                       for p in parsed.prompts]
            for _ in range(len(parsed.prompts) * parsed.n):
                places.enter_context(self.admission.admitted())
            run = Run(parsed, [], received)
            for prompt, gen in checked:
                ids, params = await _checked_async(parsed, prompt, self.inference.prepare(prompt.request, gen))
                run.prompts.append((ids, params, gen))
            shapes = Shapes(parsed, self.inference.model_name, self.inference.tokenizer)
            events = merge(self._streams(run))
            if parsed.stream:
                first = await unless_disconnected(request, anext(events))
                response: Response = EventStream(self._sse(run, shapes, first, events, places.pop_all()))
            else:
                response = JSONResponse(await unless_disconnected(request, self._whole(run, shapes, events)))
        except ClientGone:
            self._count(method, CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            return self._refuse(method, api_error(e, str))
        finally:
            places.close()
        self._count(method, 200)
        return response

    def _streams(self, run: Run) -> list[AsyncIterator[Chunk]]:
        """Every choice's stream, prompt by prompt, n each. A seeded request's choices take seed,
        seed + 1, ...: the same seed for all would give n copies of one answer."""
        streams = []
        for ids, params, gen in run.prompts:
            for j in range(run.parsed.n):
                p = params if params.seed is None or j == 0 else replace(params, seed=(params.seed + j) % 2**63)
                streams.append(with_tool_calls(self.inference.stream(ids, p, gen.stop, run.received, api="http",
                                                                     constraint=gen.constraint), gen.tools))
        return streams

    async def _whole(self, run: Run, shapes: Shapes, events: AsyncIterator[tuple[int, Chunk]]) -> dict:
        answers = [Answer() for _ in range(len(run.prompts) * run.parsed.n)]
        completion = 0
        async for index, chunk in events:
            a = answers[index]
            a.text.append(chunk.text)
            a.samples.extend(chunk.samples)
            if chunk.finish_reason is not None:
                a.finish_reason, completion = chunk.finish_reason, completion + chunk.usage.completion_tokens
                a.tool_calls = chunk.tool_calls
        return shapes.whole(answers, usage(sum(len(ids) for ids, _, _ in run.prompts), completion))

    async def _sse(self, run: Run, shapes: Shapes, first: tuple[int, Chunk], events: AsyncIterator[tuple[int, Chunk]],
                   places: ExitStack) -> AsyncIterator[bytes]:
        completion, item = 0, first
        try:
            while item is not None:
                index, chunk = item
                if chunk.usage is not None:
                    completion += chunk.usage.completion_tokens
                yield shapes.chunk(index, chunk)
                item = await anext(events, None)
            if run.parsed.include_usage:
                yield shapes.usage_chunk(usage(sum(len(ids) for ids, _, _ in run.prompts), completion))
            yield DONE
        except Exception as e:  # the status went out with the first token: the error is the last event
            yield event(api_error(e, str).body())
        finally:
            await events.aclose()
            places.close()

    def _authorize(self, request: Request) -> None:
        """Any configured key, compared in constant time with each (no early exit on a match)."""
        if self.keys is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(token.strip().encode(), key)
        if scheme.lower() != "bearer" or not ok:
            raise unauthorized()

    async def _json(self, request: Request):
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:
                raise APIError(413, f"body: is over router.max_message_bytes ({self.max_body_bytes:,} bytes)",
                               param="body", code="request_too_large")
        try:
            return json.loads(body)
        except ValueError as e:
            raise bad_field("body", f"is not valid JSON: {e}") from None

    def _refuse(self, method: str, e: APIError) -> Response:
        self._count(method, e.status)
        return e.response()

    def _count(self, method: str, status: int) -> None:
        self.metrics.requests.labels("http", method, str(status)).inc()


def _checked(parsed: Parsed, prompt: Prompt, check):
    """check()'s result, its InvalidRequest named as the body names the field."""
    try:
        return check()
    except InvalidRequest as e:
        raise api_error(e, lambda field: parsed.rename(field, prompt)) from None


async def _checked_async(parsed: Parsed, prompt: Prompt, work):
    try:
        return await work
    except InvalidRequest as e:
        raise api_error(e, lambda field: parsed.rename(field, prompt)) from None


async def _http_error(request: Request, e: HTTPException) -> Response:
    """Starlette's own refusals (no such path, a wrong method) in OpenAI's shape."""
    code = "not_found" if e.status_code == 404 else None
    return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code).response()
