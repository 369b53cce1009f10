"""What the OpenAI API answers: whole completions, streamed chunks (server-sent events), usage and
log-probabilities, in the shapes of OpenAI's API reference for chat completions and (legacy)
completions. The text and tokens come from `Inference.stream`'s chunks as they are."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from cluster.api.inference import Chunk
from cluster.api.openai.requests import Parsed
from cluster.api.openai.structured import message
from cluster.api.tokenizer import Tokenizer
from shard.sampler import Sample

DONE = b"data: [DONE]\n\n"


@dataclass
class Answer:
    """One choice as it accumulates, for a whole (not streamed) answer."""
    text: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[dict] | None = None


class Shapes:
    """The response objects of one request: its id, creation time and model on each."""

    def __init__(self, parsed: Parsed, model: str, tokenizer: Tokenizer):
        self.parsed, self.tokenizer, self.chat = parsed, tokenizer, parsed.kind == "chat"
        self.head = {"id": ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12),
                     "object": "chat.completion" if self.chat else "text_completion",
                     "created": int(time.time()), "model": model}
        self._started: set[int] = set()  # streamed choices that have had their first chunk (with the role)

    def whole(self, answers: list[Answer], usage: dict) -> dict:
        choices = []
        for i, a in enumerate(answers):
            text, logprobs = "".join(a.text), self._logprobs(a.samples) if self.parsed.logprobs else None
            body = {"message": message(text, a.tool_calls)} if self.chat else {"text": text}
            choices.append({"index": i, **body, "logprobs": logprobs, "finish_reason": a.finish_reason})
        return {**self.head, "choices": choices, "usage": usage}

    def chunk(self, index: int, c: Chunk) -> bytes:
        """One SSE event for a streamed choice's chunk."""
        logprobs = self._logprobs(c.samples) if self.parsed.logprobs else None
        if self.chat:
            delta = {"content": c.text} if not c.tool_calls else \
                {"content": None, "tool_calls": [{"index": i, **call} for i, call in enumerate(c.tool_calls)]}
            if index not in self._started:
                self._started.add(index)
                delta = {"role": "assistant", **delta}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": c.finish_reason}
            out = {**self.head, "object": "chat.completion.chunk", "choices": [choice]}
        else:
            choice = {"index": index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}
            out = {**self.head, "choices": [choice]}
        if self.parsed.include_usage:
            out["usage"] = None
        return event(out)

    def usage_chunk(self, usage: dict) -> bytes:
        """The last event with stream_options.include_usage: no choices, the request's usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return event({**self.head, "object": kind, "choices": [], "usage": usage})

    def _logprobs(self, samples: list[Sample]) -> dict:
        if self.chat:
            return {"content": [{**self._token(s.token_id, s.logprob),
                                 "top_logprobs": [self._token(t, lp) for t, lp in s.top_logprobs or ()]}
                                for s in samples]}
        tokens = [self._piece(s.token_id) for s in samples]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [s.logprob for s in samples],
                "top_logprobs": [{self._piece(t): lp for t, lp in s.top_logprobs or ()} for s in samples],
                "text_offset": offsets}

    def _token(self, token_id: int, logprob: float | None) -> dict:
        piece = self._piece(token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
