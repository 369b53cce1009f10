"""Checking what clients send, before anything is queued: every rule of caravan.v1 in one place.

Each check raises `InvalidRequest(code, field, problem)`, whose message starts with the field's
path as the client wrote it (`chat.messages[2].role: ...`), so a client can point at its mistake
without reading server logs. The codes are the proto's documented ones: INVALID_ARGUMENT for a
malformed or out-of-domain field, OUT_OF_RANGE for a request that does not fit the model (context
window, vocabulary).

Parsing happens here too (`parse`): the router receives raw bytes, so that a request the protobuf
runtime refuses (invalid UTF-8 in a string field) gets INVALID_ARGUMENT naming that field instead of
gRPC's generic INTERNAL "exception deserializing request".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from caravan.v1 import inference_pb2 as pb
from cluster.api.constraints import FieldError, check_output
from cluster.api.tools import ToolSet
from cluster.engine.grammar import Constraint
from shard.sampler import SamplingParams

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 1024
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
DEFAULT_MAX_TOKENS = 256
# Text longer than this many characters per token of context cannot fit the window with any real
# tokenizer (English averages about 4 characters a token); refusing it up front spares the router
# from tokenizing megabytes that would be refused anyway.
MAX_CHARS_PER_TOKEN = 16

M = TypeVar("M", bound=Message)


class InvalidRequest(Exception):
    def __init__(self, code: grpc.StatusCode, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.code, self.field, self.problem = code, field, problem


def invalid(field: str, problem: str) -> InvalidRequest:
    return InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, field, problem)


def out_of_range(field: str, problem: str) -> InvalidRequest:
    return InvalidRequest(grpc.StatusCode.OUT_OF_RANGE, field, problem)


@dataclass(frozen=True)
class Limits:
    """What the served model accepts."""
    context_length: int
    vocab_size: int
    has_chat_template: bool


@dataclass(frozen=True)
class Generation:
    """A checked Generate request: what to run and how to stream it."""
    prompt_field: str              # "chat", "prompt" or "token_ids": where length errors point
    params: SamplingParams         # max_tokens still unset when the client left it (see resolve_max_tokens)
    max_tokens_set: bool
    stop: tuple[str, ...]
    echo_prompt_ids: bool
    constraint: Constraint | None = None   # what the output must match (response_format, or a forced tool call)
    constraint_field: str = "response_format"
    tools: ToolSet | None = None


def parse(cls: type[M], data: bytes) -> M:
    try:
        return cls.FromString(data)
    except DecodeError:
        bad = _invalid_utf8_field(data, cls.DESCRIPTOR, "")
        if bad is not None:
            raise invalid(bad, "is not valid UTF-8; string fields carry UTF-8 text only") from None
        raise invalid("request", f"cannot be parsed as a {cls.DESCRIPTOR.full_name}; check that the client uses "
                                 "the caravan.v1 protos") from None


def _invalid_utf8_field(data: bytes, desc: Descriptor, prefix: str) -> str | None:
    """The path of the first string field (at any depth) whose bytes are not UTF-8, by walking the
    wire format; None when none is found (or the bytes are not a message at all)."""
    pos, seen = 0, dict[int, int]()
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                size, pos = _varint(data, pos)
                chunk, pos = data[pos:pos + size], pos + size
                field = desc.fields_by_number.get(number)
                if field is None:
                    continue
                name = prefix + field.name
                if field.is_repeated:
                    seen[number] = seen.get(number, -1) + 1
                    name += f"[{seen[number]}]"
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return name
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    found = _invalid_utf8_field(chunk, field.message_type, name + ".")
                    if found is not None:
                        return found
            else:
                return None
    except IndexError:
        return None
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def check_chat(chat: pb.Chat, limits: Limits, field: str = "chat") -> list[dict[str, str]]:
    """The conversation as the chat template takes it."""
    if not limits.has_chat_template:
        raise invalid(field, "this model's tokenizer has no chat template; send prompt or token_ids instead")
    if not chat.messages:
        raise invalid(f"{field}.messages", "is empty; send at least one message")
    if len(chat.messages) > MAX_MESSAGES:
        raise invalid(f"{field}.messages", f"has {len(chat.messages)} messages; at most {MAX_MESSAGES} are accepted")
    total = 0
    for i, m in enumerate(chat.messages):
        where = f"{field}.messages[{i}]"
        if not m.role:
            raise invalid(f"{where}.role", f"is missing; use one of {', '.join(ROLES)}")
        if m.role not in ROLES:
            raise invalid(f"{where}.role", f"{_show(m.role)} is not a role; use one of {', '.join(ROLES)}")
        if not m.content and not (m.role == "assistant" and m.tool_calls):
            raise invalid(f"{where}.content", "is empty; every message needs text (an assistant's, or tool_calls)")
        if m.tool_calls and m.role != "assistant":
            raise invalid(f"{where}.tool_calls", f"only an assistant turn carries tool calls, not a {m.role!r} one")
        total += len(m.content) + sum(len(c.arguments) for c in m.tool_calls)
    _check_text_size(field, total, limits)
    return [_turn(m) for m in chat.messages]


def _turn(m: pb.ChatMessage) -> dict:
    """A message as chat templates take it (OpenAI's shape for calls and tool results)."""
    turn: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                              for c in m.tool_calls]
    if m.tool_call_id:
        turn["tool_call_id"] = m.tool_call_id
    return turn


def check_text(text: str, field: str, limits: Limits) -> None:
    if not text:
        raise invalid(field, "is empty; send some text")
    _check_text_size(field, len(text), limits)


def _check_text_size(field: str, chars: int, limits: Limits) -> None:
    if chars > MAX_CHARS_PER_TOKEN * limits.context_length:
        raise out_of_range(field, f"{chars:,} characters cannot fit the model's context window of "
                                  f"{limits.context_length:,} tokens; shorten it")


def check_token_ids(ids, field: str, limits: Limits, *, allow_empty: bool = False) -> list[int]:
    if not ids and not allow_empty:
        raise invalid(field, "is empty; send at least one token id")
    if len(ids) > limits.context_length:
        raise out_of_range(field, f"has {len(ids):,} ids, more than the context window of "
                                  f"{limits.context_length:,} tokens")
    for i, t in enumerate(ids):
        if not 0 <= t < limits.vocab_size:
            raise out_of_range(f"{field}[{i}]", f"{t} is outside the vocabulary [0, {limits.vocab_size})")
    return list(ids)


def check_generate(req: pb.GenerateRequest, limits: Limits) -> Generation:
    """Every field's own rule; the prompt's length is checked once tokenized (`check_prompt_length`)."""
    which = req.WhichOneof("input")
    if which is None:
        raise invalid("input", "is missing; set one of chat, prompt or token_ids")
    if which == "chat":
        check_chat(req.chat, limits)
    elif which == "prompt":
        check_text(req.prompt, "prompt", limits)
    else:
        check_token_ids(req.token_ids.ids, "token_ids.ids", limits)

    s = req.sampling
    temperature = s.temperature if s.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        raise invalid("sampling.temperature", f"{temperature} is out of range; use 0 (greedy) to {MAX_TEMPERATURE:g}")
    if not 0 <= s.top_k <= limits.vocab_size:
        raise invalid("sampling.top_k", f"{s.top_k} is out of range; use 0 (off) to the vocabulary size "
                                        f"{limits.vocab_size}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise invalid("sampling.top_p", f"{top_p} is out of range; use a number in (0, 1]")
    if s.HasField("seed") and s.seed >= 2**63:
        raise invalid("sampling.seed", f"{s.seed} is out of range; use 0 to 2^63 - 1")
    if req.HasField("max_tokens") and req.max_tokens < 1:
        raise invalid("max_tokens", f"{req.max_tokens} is out of range; use at least 1, or leave it unset")

    if len(req.stop) > MAX_STOP_STRINGS:
        raise invalid("stop", f"has {len(req.stop)} strings; at most {MAX_STOP_STRINGS} are accepted")
    for i, text in enumerate(req.stop):
        if not 1 <= len(text) <= MAX_STOP_CHARS:
            raise invalid(f"stop[{i}]", f"has {len(text)} characters; use 1 to {MAX_STOP_CHARS}")
    if len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise invalid("stop_token_ids", f"has {len(req.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are accepted")
    check_token_ids(req.stop_token_ids, "stop_token_ids", limits, allow_empty=True)
    if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise invalid("top_logprobs", f"{req.top_logprobs} is out of range; use 0 to {MAX_TOP_LOGPROBS}")
    if req.top_logprobs and not req.logprobs:
        raise invalid("top_logprobs", "needs logprobs: true")

    params = SamplingParams(
        temperature=temperature, top_k=s.top_k, top_p=top_p, seed=s.seed if s.HasField("seed") else None,
        max_tokens=req.max_tokens if req.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        stop_token_ids=frozenset(req.stop_token_ids), ignore_eos=req.ignore_eos,
        logprobs=req.top_logprobs if req.logprobs else None,
        speculate=req.speculate or not req.HasField("speculate"))
    try:
        constraint, tools, constraint_field = check_output(req)
    except FieldError as e:
        raise invalid(e.field, e.problem) from None
    return Generation(which, params, req.HasField("max_tokens"), tuple(req.stop), req.echo_prompt_ids,
                      constraint, constraint_field, tools)


def check_prompt_length(gen: Generation, prompt_len: int, limits: Limits) -> SamplingParams:
    """The request's parameters with max_tokens settled: an explicit one must fit the context with
    the prompt; an unset one is the default, cut to what the context has left."""
    if prompt_len == 0:
        raise invalid(gen.prompt_field, "produces no tokens; send some text")
    ctx = limits.context_length
    return _fit(gen, prompt_len, gen.params, ctx, f"the context window of {ctx:,}")


def check_kv_fit(gen: Generation, prompt_len: int, params: SamplingParams, kv_tokens: int | None) -> SamplingParams:
    """As `check_prompt_length`, against what one sequence can hold in a replica's KV cache
    (`kv_tokens`, a lane's share of its blocks; None when no replica has said): a prompt that fits the
    context window may not fit there."""
    if kv_tokens is None:
        return params
    return _fit(gen, prompt_len, params, kv_tokens, f"the {kv_tokens:,} tokens of one sequence a replica's KV cache "
                                                    "holds (kv_cache.memory_per_shard, block_size and the pipeline's "
                                                    "lanes set it)")


def _fit(gen: Generation, prompt_len: int, params: SamplingParams, limit: int, what: str) -> SamplingParams:
    if prompt_len >= limit:
        raise out_of_range(gen.prompt_field, f"is {prompt_len:,} tokens; {what} leaves no token to generate")
    if not gen.max_tokens_set:
        return replace(params, max_tokens=min(params.max_tokens, limit - prompt_len))
    if prompt_len + params.max_tokens > limit:
        raise out_of_range("max_tokens", f"{params.max_tokens:,} + the prompt's {prompt_len:,} tokens exceed {what}; "
                                         f"use at most {limit - prompt_len:,}")
    return params


def _show(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
