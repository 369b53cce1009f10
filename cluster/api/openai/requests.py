"""An OpenAI request body -> the caravan.v1 `GenerateRequest`s a gRPC client would send for it.

Only the JSON shapes are checked here (is `temperature` a number, is `messages` a list); every rule
about values (ranges, the context window, the vocabulary, roles) is `cluster.api.validate`'s, run
on the built requests, and its field paths are renamed back to the body's (`rename`). A field this
server does not implement is refused naming it, never dropped; a few are accepted at the value that
changes nothing (`frequency_penalty: 0`, `echo: false`), because common clients always send them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from caravan.v1 import inference_pb2 as pb
from cluster.api.openai import structured
from cluster.api.openai.errors import bad_field

# Choices of one request (prompts x n): each is a sequence in flight, so they are bounded like a batch.
MAX_CHOICES = 128
# OpenAI's default for /v1/completions; chat leaves it unset (the router's default, cut to the context).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

_COMMON = ("model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "user",
           "frequency_penalty", "presence_penalty", "logit_bias",
           "top_k", "ignore_eos", "stop_token_ids",  # these three as vLLM and TGI name them
           "speculate")  # this server's own: false opts the request out of speculative decoding
_FIELDS = {"chat": frozenset(_COMMON + ("messages", "max_completion_tokens", "logprobs", "top_logprobs",
                                       "response_format", "tools", "tool_choice", "parallel_tool_calls")),
           "completions": frozenset(_COMMON + ("prompt", "logprobs", "echo", "best_of", "suffix"))}
# Accepted only at the value that means "off": anything else would be silently ignored.
_NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "echo": (False,),
            "best_of": (1,), "suffix": ("",), "parallel_tool_calls": (True,)}
_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}


@dataclass(frozen=True)
class Prompt:
    request: pb.GenerateRequest
    field: str                  # where the prompt is in the body: "messages", "prompt", "prompt[2]"


@dataclass(frozen=True)
class Parsed:
    kind: str                   # "chat" or "completions"
    model: str
    prompts: list[Prompt]       # one for chat; completions take a list of prompts
    n: int                      # choices per prompt
    stream: bool
    include_usage: bool         # stream_options.include_usage: a last chunk with the usage
    max_tokens_field: str       # max_tokens or max_completion_tokens, as the client wrote it

    @property
    def logprobs(self) -> bool:
        return self.prompts[0].request.logprobs

    def rename(self, field: str, prompt: Prompt) -> str:
        """A caravan.v1 field path as this body names it."""
        head, _, rest = field.partition(".")
        if head == "sampling":
            return rest
        if head in ("input", "prompt", "token_ids"):
            index = rest[rest.index("["):] if "[" in rest else ""
            return prompt.field + index
        if (named := structured.rename(field)) is not None:
            return named
        if head == "chat":
            return "messages" + rest[len("messages"):]
        if field == "max_tokens":
            return self.max_tokens_field
        if field == "top_logprobs" and self.kind == "completions":
            return "logprobs"
        return field


def parse(body: Any, kind: str) -> Parsed:
    """The body of POST /v1/chat/completions (`kind` "chat") or /v1/completions ("completions")."""
    if not isinstance(body, dict):
        raise bad_field("body", "must be a JSON object")
    for key, value in body.items():
        if key not in _FIELDS[kind]:
            raise bad_field(key, "is not supported by this server; remove it")
        if key in _NEUTRAL and value is not None and value not in _NEUTRAL[key]:
            raise bad_field(key, f"is not supported by this server; leave it unset or {_NEUTRAL[key][0]!r}")
    model = _get(body, "model", str)
    if model is None:
        raise bad_field("model", "is required; GET /v1/models lists the served model")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict)
    if options is not None and not stream:
        raise bad_field("stream_options", "is only allowed with stream: true")
    for key in options or ():
        if key != "include_usage":
            raise bad_field(f"stream_options.{key}", "is not supported by this server; remove it")
    include_usage = _get(options or {}, "include_usage", bool, False, "stream_options.")

    max_field, max_tokens = _max_tokens(body, kind)
    template = pb.GenerateRequest(ignore_eos=_get(body, "ignore_eos", bool, False))
    _set(template, "max_tokens", max_tokens, max_field)
    _set(template, "speculate", _get(body, "speculate", bool), "speculate")
    _set(template.sampling, "temperature", _get(body, "temperature", float), "temperature")
    _set(template.sampling, "top_p", _get(body, "top_p", float), "top_p")
    _set(template.sampling, "seed", _get(body, "seed", int), "seed")
    top_k = _get(body, "top_k", int)
    _set(template.sampling, "top_k", 0 if top_k == -1 else top_k, "top_k")  # -1: off, as vLLM spells it
    template.stop.extend(_stop(body))
    _set_list(template.stop_token_ids, _list_of(body, "stop_token_ids", int), "stop_token_ids")
    if kind == "chat":
        template.logprobs = _get(body, "logprobs", bool, False)
        _set(template, "top_logprobs", _get(body, "top_logprobs", int), "top_logprobs")
        structured.set_response_format(template, body)
        prompts = [Prompt(_chat(template, body), "messages")]
    else:
        logprobs = _get(body, "logprobs", int)
        template.logprobs = logprobs is not None
        _set(template, "top_logprobs", logprobs, "logprobs")
        prompts = _prompts(template, body)

    n = _get(body, "n", int, 1)
    if not 1 <= n <= MAX_CHOICES // len(prompts):
        raise bad_field("n", f"{n} is out of range; use 1 to {MAX_CHOICES // len(prompts)} "
                             f"(at most {MAX_CHOICES} choices per request, prompts x n)")
    return Parsed(kind, model, prompts, n, stream, include_usage, max_field)


def _get(body: dict, key: str, want: type, default: Any = None, prefix: str = "") -> Any:
    """body[key] if it has the JSON type `want` (an int is a number; a bool is not); null is unset."""
    value = body.get(key)
    if value is None:
        return default
    ok = (type(value) in (int, float) if want is float else type(value) is want)
    if not ok:
        raise bad_field(prefix + key, f"must be {_TYPES[want]}, got {type(value).__name__} {_short(value)}")
    return value


def _list_of(body: dict, key: str, want: type) -> list:
    values = _get(body, key, list, [])
    for i, v in enumerate(values):
        _get({f"{key}[{i}]": v}, f"{key}[{i}]", want)
    return values


def _set(message, name: str, value: Any, param: str) -> None:
    """message.name = value, unless unset; a value the proto cannot hold (a negative seed, an id past
    int64) is the client's field that is out of range."""
    if value is None:
        return
    try:
        setattr(message, name, value)
    except (ValueError, TypeError):
        raise bad_field(param, f"{_short(value)} is out of range") from None


def _set_list(repeated, values: list, param: str) -> None:
    for i, v in enumerate(values):
        try:
            repeated.append(v)
        except (ValueError, TypeError):
            raise bad_field(f"{param}[{i}]", f"{_short(v)} is out of range") from None


def _max_tokens(body: dict, kind: str) -> tuple[str, int | None]:
    legacy, new = _get(body, "max_tokens", int), _get(body, "max_completion_tokens", int)
    if legacy is not None and new is not None and legacy != new:
        raise bad_field("max_completion_tokens", f"{new} differs from max_tokens {legacy}; send one of them")
    if new is not None:
        return "max_completion_tokens", new
    if legacy is None and kind == "completions":
        return "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS
    return "max_tokens", legacy


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop]
    return _list_of(body, "stop", str)


def _chat(template: pb.GenerateRequest, body: dict) -> pb.GenerateRequest:
    messages = _get(body, "messages", list)
    if messages is None:
        raise bad_field("messages", "is required: a list of {role, content} messages")
    request = pb.GenerateRequest()
    request.CopyFrom(template)
    chat = request.chat
    chat.SetInParent()  # present even when empty, so that validation says "messages: is empty"
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_field(where, "must be an object with role and content")
        for key, value in m.items():
            if key not in ("role", "content", "tool_calls", "tool_call_id", "name") and value is not None:
                raise bad_field(f"{where}.{key}", "is not supported by this server; send role, content, "
                                                  "tool_calls or tool_call_id")
        _get(m, "role", str, "", where + ".")
        structured.add_message(chat, m, where, _content(m.get("content"), where))
    structured.set_tools(chat, body)
    return request


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_field(f"{where}.content", f"must be a string or a list of text parts, got {_short(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_field(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are "
                                                     "supported by this server")
        texts.append(part["text"])
    return "".join(texts)


def _prompts(template: pb.GenerateRequest, body: dict) -> list[Prompt]:
    """prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_field("prompt", "is required: a string, a list of strings, or token ids")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
        return [_prompt(template, prompt, "prompt")]
    if not isinstance(prompt, list) or not prompt:
        raise bad_field("prompt", "must be a string, a list of strings, or token ids (a non-empty list)")
    if len(prompt) > MAX_CHOICES:
        raise bad_field("prompt", f"has {len(prompt)} prompts; at most {MAX_CHOICES} are accepted")
    out = []
    for i, p in enumerate(prompt):
        if not (isinstance(p, str) or (isinstance(p, list) and all(type(t) is int for t in p))):
            raise bad_field(f"prompt[{i}]", "must be a string or a list of token ids, as the other prompts")
        out.append(_prompt(template, p, f"prompt[{i}]"))
    return out


def _prompt(template: pb.GenerateRequest, prompt: str | list[int], field: str) -> Prompt:
    request = pb.GenerateRequest()
    request.CopyFrom(template)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.token_ids.SetInParent()
        _set_list(request.token_ids.ids, prompt, field)
    return Prompt(request, field)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
