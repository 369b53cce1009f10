"""Offline generation over one replica: every request starts together and runs to its end.

This is the simplest driver that exercises the whole data plane (prefill of mixed lengths, then
batched decode over the paged cache); the continuous-batching engine replaces it for serving.
KV blocks are reserved up front for each request's whole budget, so nothing is ever preempted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from shard.sampler import SamplingParams, stop_reason
from shard.worker import SeqChunk, StepInput, StepOutput


class Replica(Protocol):
    block_size: int
    num_blocks: int

    def step(self, step: StepInput) -> StepOutput: ...


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class TokenEvent:
    index: int                      # which request
    token_id: int
    logprob: float | None
    finish_reason: str | None       # "stop", "length", or None while the request goes on
    logits: torch.Tensor | None = None


class RequestError(ValueError):
    """A request the model cannot run; the message names the request and the fix."""


def blocks_needed(requests: list[Request], block_size: int) -> int:
    return sum(-(-(len(r.prompt_ids) + r.params.max_tokens) // block_size) for r in requests)


def check_request(prompt_ids: list[int], params: SamplingParams, max_len: int, vocab_size: int | None = None) -> None:
    """Raises RequestError when the model could never run this request."""
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if len(prompt_ids) + params.max_tokens > max_len:
        raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                           f"model's context of {max_len} tokens; lower max_tokens or shorten the prompt")
    bad = [] if vocab_size is None else [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token ids {bad[:5]} are outside the model's vocabulary of {vocab_size}; "
                           f"does the tokenizer belong to this model?")


def check_requests(requests: list[Request], max_len: int, vocab_size: int) -> None:
    for i, r in enumerate(requests):
        try:
            check_request(r.prompt_ids, r.params, max_len, vocab_size)
        except RequestError as e:
            raise RequestError(f"request {i}: {e}") from None


def generate(replica: Replica, requests: list[Request], eos_token_ids: frozenset[int], *,
             return_logits: bool = False) -> Iterator[TokenEvent]:
    """Yields each request's tokens as they are sampled, one step at a time."""
    bs = replica.block_size
    if blocks_needed(requests, bs) > replica.num_blocks:
        raise ValueError(f"{blocks_needed(requests, bs)} KV blocks needed, the replica has {replica.num_blocks}")
    tables, first = [], 0
    for r in requests:
        n = -(-(len(r.prompt_ids) + r.params.max_tokens) // bs)
        tables.append(list(range(first, first + n)))
        first += n
    outputs: list[list[int]] = [[] for _ in requests]
    chunks = [SeqChunk(i, list(r.prompt_ids), 0, tables[i], r.params, 0) for i, r in enumerate(requests)]
    while chunks:
        out = replica.step(StepInput(chunks, return_logits=return_logits))
        following = []
        for row, chunk in enumerate(chunks):
            i, smp = chunk.seq_id, out.samples[chunk.seq_id]
            outputs[i].append(smp.token_id)
            reason = stop_reason(requests[i].params, smp.token_id, len(outputs[i]), eos_token_ids)
            yield TokenEvent(i, smp.token_id, smp.logprob, reason, out.logits[row] if out.logits is not None else None)
            if reason is None:
                context = len(requests[i].prompt_ids) + len(outputs[i]) - 1
                following.append(SeqChunk(i, [smp.token_id], context, tables[i], requests[i].params, len(outputs[i])))
        chunks = following
