"""A generated suite of malformed requests, each with the one gRPC code and the field path its error
must name. The same suite runs against the in-process router and the one on a Ray cluster."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from caravan.v1 import admin_pb2 as apb
from caravan.v1 import inference_pb2 as pb

INVALID, OUT_OF_RANGE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE


@dataclass(frozen=True)
class Case:
    name: str
    method: str          # full gRPC method path
    request: bytes       # raw bytes: some cases are not valid protobuf at all
    code: grpc.StatusCode
    field: str           # the error's details must start with "<field>:"
    admin: bool = False  # needs the admin token


def _chat(*turns: tuple[str, str]) -> pb.Chat:
    return pb.Chat(messages=[pb.ChatMessage(role=r, content=c) for r, c in turns])


def _inputs() -> dict[str, pb.GenerateRequest]:
    return {"chat": pb.GenerateRequest(chat=_chat(("user", "Hi"))),
            "prompt": pb.GenerateRequest(prompt="The llama is"),
            "token_ids": pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]))}


def _generate(name: str, req: pb.GenerateRequest | bytes, code: grpc.StatusCode, field: str) -> Case:
    data = req if isinstance(req, bytes) else req.SerializeToString()
    return Case(name, "/caravan.v1.Inference/Generate", data, code, field)


def _with(base: pb.GenerateRequest, **changes) -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    req.CopyFrom(base)
    for key, value in changes.items():
        if key.startswith("sampling_"):
            setattr(req.sampling, key[len("sampling_"):], value)
        elif isinstance(value, list):
            getattr(req, key).extend(value)
        else:
            setattr(req, key, value)
    return req


def _string_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field with arbitrary bytes, as a client with a broken encoder might send."""
    size, length = len(payload), b""
    while size >= 0x80:
        length, size = length + bytes([size & 0x7F | 0x80]), size >> 7
    return bytes([number << 3 | 2]) + length + bytes([size]) + payload


def cases(context_length: int, vocab_size: int) -> list[Case]:
    out: list[Case] = []
    v, ctx = vocab_size, context_length

    out.append(_generate("no input", pb.GenerateRequest(max_tokens=4), INVALID, "input"))
    out.append(_generate("no input, only sampling", pb.GenerateRequest(sampling=pb.SamplingParams(temperature=0)),
                         INVALID, "input"))

    # Chat structure.
    out.append(_generate("chat without messages", pb.GenerateRequest(chat=pb.Chat()), INVALID, "chat.messages"))
    out.append(_generate("1025 messages", pb.GenerateRequest(chat=_chat(*[("user", "x")] * 1025)), INVALID,
                         "chat.messages"))
    bad_roles = ["", "User", "USER", "bot", "system ", " user", "admin", "human", "model", "\x00", "assistant\n",
                 "function", "developer", "ユーザー", "user\u200b"]
    for pos in range(3):
        for role in bad_roles:
            turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")]
            turns[pos] = (role, turns[pos][1])
            out.append(_generate(f"role {role!r} at {pos}", pb.GenerateRequest(chat=_chat(*turns)), INVALID,
                                 f"chat.messages[{pos}].role"))
        turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")]
        turns[pos] = (turns[pos][0], "")
        out.append(_generate(f"empty content at {pos}", pb.GenerateRequest(chat=_chat(*turns)), INVALID,
                             f"chat.messages[{pos}].content"))

    # Raw prompt and token ids.
    out.append(_generate("empty prompt", pb.GenerateRequest(prompt=""), INVALID, "prompt"))
    out.append(_generate("prompt of too many characters", pb.GenerateRequest(prompt="a" * (16 * ctx + 1)),
                         OUT_OF_RANGE, "prompt"))
    out.append(_generate("prompt of too many tokens", pb.GenerateRequest(prompt=" hi" * (ctx + 10)), OUT_OF_RANGE,
                         "prompt"))
    out.append(_generate("chat of too many tokens", pb.GenerateRequest(chat=_chat(("user", " hi" * (ctx + 10)))),
                         OUT_OF_RANGE, "chat"))
    out.append(_generate("empty token ids", pb.GenerateRequest(token_ids=pb.TokenIds()), INVALID, "token_ids.ids"))
    for i, bad in enumerate([-1, v, v + 1, 2**40, -2**40, 2**63 - 1]):
        ids = [5, 6, 7]
        ids[i % 3] = bad
        out.append(_generate(f"token id {bad}", pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids)), OUT_OF_RANGE,
                             f"token_ids.ids[{i % 3}]"))
    out.append(_generate("token ids past the context", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * (ctx + 1))),
                         OUT_OF_RANGE, "token_ids.ids"))
    out.append(_generate("token ids fill the context", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * ctx)),
                         OUT_OF_RANGE, "token_ids"))

    # Every bad sampling value, with each kind of input.
    numeric = [("sampling_temperature", x, "sampling.temperature") for x in (-1, -1e-3, math.nan, math.inf, -math.inf,
                                                                             100.5, 101, 1e30)]
    numeric += [("sampling_top_k", x, "sampling.top_k") for x in (-1, -100, v + 1, 2**31 - 1)]
    numeric += [("sampling_top_p", x, "sampling.top_p") for x in (0, -0.5, 1.0001, 2, math.nan, math.inf, -math.inf)]
    numeric += [("sampling_seed", x, "sampling.seed") for x in (2**63, 2**64 - 1)]
    numeric += [("max_tokens", x, "max_tokens") for x in (0, -1, -2**31)]
    numeric += [("top_logprobs", x, "top_logprobs") for x in (-1, 21, 1000)]
    for kind, base in _inputs().items():
        for key, value, field in numeric:
            extra = {"logprobs": True} if key == "top_logprobs" else {}
            out.append(_generate(f"{kind}: {key}={value}", _with(base, **{key: value}, **extra), INVALID, field))
        out.append(_generate(f"{kind}: max_tokens = context", _with(base, max_tokens=ctx), OUT_OF_RANGE, "max_tokens"))
        out.append(_generate(f"{kind}: max_tokens past context", _with(base, max_tokens=2**31 - 1), OUT_OF_RANGE,
                             "max_tokens"))
        out.append(_generate(f"{kind}: top_logprobs without logprobs", _with(base, top_logprobs=3), INVALID,
                             "top_logprobs"))
        out.append(_generate(f"{kind}: 17 stop strings", _with(base, stop=[f"s{i}" for i in range(17)]), INVALID,
                             "stop"))
        out.append(_generate(f"{kind}: empty stop string", _with(base, stop=["ok", ""]), INVALID, "stop[1]"))
        out.append(_generate(f"{kind}: long stop string", _with(base, stop=["x" * 257]), INVALID, "stop[0]"))
        out.append(_generate(f"{kind}: 65 stop ids", _with(base, stop_token_ids=list(range(65))), INVALID,
                             "stop_token_ids"))
        out.append(_generate(f"{kind}: negative stop id", _with(base, stop_token_ids=[3, -4]), OUT_OF_RANGE,
                             "stop_token_ids[1]"))
        out.append(_generate(f"{kind}: stop id past vocab", _with(base, stop_token_ids=[v]), OUT_OF_RANGE,
                             "stop_token_ids[0]"))

    # Bytes the protobuf runtime refuses: invalid UTF-8 in string fields, at several depths.
    for name, raw in [("\\xff", b"\xff"), ("lone continuation", b"a\x80b"), ("overlong", b"\xc0\xaf"),
                      ("surrogate", b"\xed\xa0\x80"), ("truncated", b"ok\xe2\x82")]:
        out.append(_generate(f"prompt {name}", _string_field(2, raw), INVALID, "prompt"))
        message = _string_field(1, b"user") + _string_field(2, raw)
        chat = _string_field(1, _string_field(1, b"user") + _string_field(2, b"hi")) + _string_field(1, message)
        out.append(_generate(f"chat content {name}", _string_field(1, chat), INVALID, "chat.messages[1].content"))
        role = _string_field(1, _string_field(1, raw) + _string_field(2, b"hi"))
        out.append(_generate(f"chat role {name}", _string_field(1, role), INVALID, "chat.messages[0].role"))
        out.append(_generate(f"stop {name}", _string_field(2, b"hi") + _string_field(6, b"a") + _string_field(6, raw),
                             INVALID, "stop[1]"))
    out.append(_generate("not protobuf", b"\xff\xff\xff\xff", INVALID, "request"))
    out.append(_generate("truncated field", b"\x12\x10abc", INVALID, "request"))

    # The other methods.
    tok, detok = "/caravan.v1.Inference/Tokenize", "/caravan.v1.Inference/Detokenize"
    out.append(Case("tokenize nothing", tok, b"", INVALID, "input"))
    out.append(Case("tokenize empty text", tok, pb.TokenizeRequest(text="").SerializeToString(), INVALID, "text"))
    out.append(Case("tokenize empty chat", tok, pb.TokenizeRequest(chat=pb.Chat()).SerializeToString(), INVALID,
                    "chat.messages"))
    out.append(Case("tokenize bad role", tok, pb.TokenizeRequest(chat=_chat(("robot", "hi"))).SerializeToString(),
                    INVALID, "chat.messages[0].role"))
    out.append(Case("tokenize bad UTF-8", tok, _string_field(1, b"\xff"), INVALID, "text"))
    for i, bad in enumerate([-1, v, 2**40]):
        out.append(Case(f"detokenize {bad}", detok, pb.DetokenizeRequest(token_ids=[1, bad]).SerializeToString(),
                        OUT_OF_RANGE, "token_ids[1]"))
    out.append(Case("detokenize too many", detok, pb.DetokenizeRequest(token_ids=[1] * (ctx + 1)).SerializeToString(),
                    OUT_OF_RANGE, "token_ids"))
    scale, drain = "/caravan.v1.Admin/Scale", "/caravan.v1.Admin/Drain"
    for n in (0, -1, -2**31):
        out.append(Case(f"scale to {n}", scale, apb.ScaleRequest(replicas=n).SerializeToString(), INVALID, "replicas",
                        admin=True))
    for g in (-1, math.nan, math.inf, 1e9):
        out.append(Case(f"drain grace {g}", drain, apb.DrainRequest(grace_period_s=g).SerializeToString(), INVALID,
                        "grace_period_s", admin=True))
    return out
