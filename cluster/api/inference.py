"""The Inference service: Generate, Tokenize, Detokenize, ModelInfo.

`Inference.stream` is the one path of a request inside the router, whichever door it came in by: a
checked prompt and parameters in, text chunks out. It waits for a serving replica, hands the ids
to the backend (which picks the replica), turns tokens into text with stop strings applied, and
counts the request's metrics. Leaving its iterator (a finished or cancelled call, a deadline, a
stop string) closes the replica's stream, which aborts the sequence there and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from caravan.v1 import inference_pb2 as pb
from cluster.api.admission import Admission, Refused
from cluster.api.backend import Backend
from cluster.api.constraints import FieldError, check_tools, compile_check
from cluster.api.tools import ToolSet, parse_calls, template_takes_tools, template_tools, tool_messages
from cluster.api.metrics import RouterMetrics
from cluster.api.textstream import TextStream
from cluster.api.tokenizer import Tokenizer
from cluster.api.validate import (Generation, Limits, check_chat, check_generate, check_kv_fit, check_prompt_length,
                                  check_text, check_token_ids, invalid)
from cluster.config import ServeConfig
from cluster.engine.grammar import Constraint, Grammars
from shard.sampler import Sample, SamplingParams

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "tool_calls": pb.FINISH_REASON_TOOL_CALLS}


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    total_time_s: float


@dataclass
class Chunk:
    """Text that can be sent, with the tokens it came from (an incomplete character's tokens go out
    with the next text); the last chunk has a finish reason and the usage."""
    text: str
    samples: list[Sample] = field(default_factory=list)
    finish_reason: str | None = None     # "stop" (EOS, a stop id or a stop string), "length" or "tool_calls"
    usage: Usage | None = None
    tool_calls: list[dict] | None = None  # with "tool_calls": OpenAI-shaped calls (`cluster.api.openai.structured`)


class Inference:
    def __init__(self, config: ServeConfig, tokenizer: Tokenizer, limits: Limits, backend: Backend,
                 admission: Admission, metrics: RouterMetrics, model_name: str):
        self.config, self.tokenizer, self.limits, self.backend = config, tokenizer, limits, backend
        self.admission, self.metrics, self.model_name = admission, metrics, model_name
        self._ids = itertools.count(1)
        # Compiles constraints to refuse bad ones before they are queued (each replica compiles its own).
        self.grammars = Grammars(tokenizer.folder, limits.vocab_size, tokenizer.eos_token_ids)

    def request_id(self) -> str:
        return f"req-{next(self._ids)}"

    async def stream(self, prompt_ids: list[int], params: SamplingParams, stop: tuple[str, ...], received: float,
                     time_remaining: float | None = None, *, api: str = "grpc",
                     constraint: Constraint | None = None) -> AsyncIterator[Chunk]:
        """The request's text as its replica samples it. The caller holds an admission place; `api` names
        the front door in the latency metrics; `constraint`, what the output must match."""
        self.metrics.queue_depth.inc()
        first_sent: float | None = None
        try:
            await self.admission.wait_for_replica(time_remaining)
            self.metrics.prompt_tokens.inc(len(prompt_ids))
            text, samples, produced = TextStream(self.tokenizer, stop), [], 0
            if constraint is not None:
                self.metrics.constrained.labels(api).inc()
            args = (prompt_ids, params) if constraint is None else (prompt_ids, params, constraint)
            async with aclosing(self.backend.generate(*args)) as updates:
                async for update in updates:
                    if time.monotonic() - received > self.config.router.max_request_s:
                        raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, (
                            f"the request streamed for more than router.max_request_s="
                            f"{self.config.router.max_request_s:g} s and was ended; ask for fewer tokens"))
                    produced += 1
                    samples.append(update.sample)
                    delta = text.push(update.sample.token_id)
                    finish = "stop" if text.stopped else update.finish_reason
                    if finish is not None and not text.stopped:
                        delta += text.finish()
                    if not delta and finish is None:
                        continue  # an incomplete character: its ids go out with the next text
                    if first_sent is None:
                        first_sent = time.monotonic()
                        self.metrics.queue_depth.dec()
                        self.metrics.ttft.labels(api).observe(first_sent - received)
                    chunk = Chunk(delta, samples)
                    self.metrics.add_generated(len(samples))
                    samples = []
                    if finish is not None:
                        chunk.finish_reason = finish
                        chunk.usage = self._usage(len(prompt_ids), produced, received, first_sent, api)
                    yield chunk
                    if finish is not None:
                        return  # leaving the stream early (a stop string) aborts the sequence
        finally:
            if first_sent is None:
                self.metrics.queue_depth.dec()

    def _usage(self, prompt_tokens: int, produced: int, received: float, first_sent: float, api: str) -> Usage:
        done = time.monotonic()
        if produced > 1:
            self.metrics.tpot.labels(api).observe((done - first_sent) / (produced - 1))
        return Usage(prompt_tokens, produced, first_sent - received, done - received)

    async def prepare(self, req: pb.GenerateRequest, gen: Generation) -> tuple[list[int], SamplingParams]:
        """A checked request's prompt ids (chat template applied) and its parameters, max_tokens settled
        against the prompt's length. Runs inside the request's admission: tokenizing is work."""
        if gen.constraint is not None:
            started = time.perf_counter()
            try:
                await compile_check(self.grammars, gen.constraint, gen.constraint_field, gen.tools)
            except FieldError as e:
                raise invalid(e.field, e.problem) from None
            self.metrics.grammar_compile.observe(time.perf_counter() - started)
        prompt_ids = await self.prompt_ids(req, gen.tools)
        params = check_prompt_length(gen, len(prompt_ids), self.limits)
        return prompt_ids, check_kv_fit(gen, len(prompt_ids), params, self.admission.health.sequence_kv_tokens())

    async def prompt_ids(self, req: pb.GenerateRequest, tools: ToolSet | None = None) -> list[int]:
        which = req.WhichOneof("input")
        if which == "token_ids":
            return list(req.token_ids.ids)
        if which == "prompt":
            return await asyncio.to_thread(self.tokenizer.encode, req.prompt)
        return await self.chat_ids(check_chat(req.chat, self.limits, "chat"), "chat", tools)

    async def chat_ids(self, messages: list[dict], field: str, tools: ToolSet | None = None) -> list[int]:
        """A checked conversation through the model's own chat template: with its tools, calls and
        results as the template takes them, or written in by `cluster.api.tools` where it does not."""
        template = self.tokenizer.chat_template
        if template_takes_tools(template):
            args = (messages, template_tools(tools))
        else:
            args = (tool_messages(messages, tools, "<|start_header_id|>" in (template or "")), None)
        try:
            return await asyncio.to_thread(self.tokenizer.apply_chat_template, *args)
        except Exception as e:  # the template's own rules (alternating roles, a system turn first, ...)
            raise invalid(f"{field}.messages", f"the model's chat template refused them: {e}") from None

    # ---- the gRPC methods ----

    async def Generate(self, req: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        received = time.monotonic()
        gen = check_generate(req, self.limits)
        with self.admission.admitted():
            prompt_ids, params = await self.prepare(req, gen)
            first = pb.GenerateResponse(request_id=self.request_id(),
                                        prompt_token_ids=prompt_ids if gen.echo_prompt_ids else ())
            remaining = context.time_remaining() if context is not None else None
            text = []
            async for chunk in self.stream(prompt_ids, params, gen.stop, received, remaining, constraint=gen.constraint):
                response, first = (first if first is not None else pb.GenerateResponse()), None
                response.text = chunk.text
                response.token_ids[:] = [s.token_id for s in chunk.samples]
                if params.logprobs is not None:
                    response.logprobs.extend(_logprob(s) for s in chunk.samples)
                text.append(chunk.text)
                if chunk.finish_reason is not None:
                    u = chunk.usage
                    calls = parse_calls("".join(text), gen.tools) if gen.tools and gen.tools.parses else []
                    response.tool_calls.extend(pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls)
                    response.finish_reason = _FINISH["tool_calls" if calls else chunk.finish_reason]
                    response.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens,
                                                     completion_tokens=u.completion_tokens,
                                                     time_to_first_token_s=u.time_to_first_token_s,
                                                     total_time_s=u.total_time_s))
                yield response

    # Tokenize, Detokenize and ModelInfo hold an admission place too: tokenizing is work, and a flood of
    # them must meet the same bound as Generate.

    async def Tokenize(self, req: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        which = req.WhichOneof("input")
        if which is None:
            raise invalid("input", "is missing; set one of text or chat")
        with self.admission.admitted():
            if which == "text":
                check_text(req.text, "text", self.limits)
                ids = await asyncio.to_thread(self.tokenizer.encode, req.text)
            else:
                try:
                    tools = check_tools(req.chat)
                except FieldError as e:
                    raise invalid(e.field, e.problem) from None
                ids = await self.chat_ids(check_chat(req.chat, self.limits, "chat"), "chat", tools)
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, req: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        ids = check_token_ids(req.token_ids, "token_ids", self.limits, allow_empty=True)
        with self.admission.admitted():
            text = await asyncio.to_thread(self.tokenizer.decode, ids, req.skip_special_tokens)
        return pb.DetokenizeResponse(text=text)

    async def ModelInfo(self, req: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        layout = self.config.layout
        self.admission.check()  # refused like any other call while draining or full; too cheap to hold a place
        return pb.ModelInfoResponse(
            model=self.model_name, context_length=self.limits.context_length, vocab_size=self.limits.vocab_size,
            tensor_parallel=layout.tp, pipeline_parallel=layout.pp, replicas=len(self.admission.health.replicas),
            dtype=self.config.model.dtype, eos_token_ids=sorted(self.tokenizer.eos_token_ids),
            chat_template=self.limits.has_chat_template)


def _logprob(s: Sample) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=s.token_id, logprob=s.logprob or 0.0,
                           top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in s.top_logprobs or ()])
