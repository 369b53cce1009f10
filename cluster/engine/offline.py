"""Offline generation over one replica: every request starts together and runs to its end.

This is the simplest driver of the data plane (prefill of mixed lengths, then batched decode over
the paged cache), through the same `Executor` the serving engine drives; `caravan generate` and the
equivalence tests use it, with logits when asked. KV blocks are reserved up front for each
request's whole budget, so nothing is ever preempted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Iterator

import torch

from cluster.engine.executor import Executor
from cluster.engine.request import RequestError, check_request
from shard.sampler import SamplingParams, stop_reason
from shard.worker import SeqChunk, StepInput


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


def blocks_needed(requests: list[Request], block_size: int) -> int:
    return sum(-(-(len(r.prompt_ids) + r.params.max_tokens) // block_size) for r in requests)


def check_requests(requests: list[Request], max_len: int, vocab_size: int) -> None:
    for i, r in enumerate(requests):
        try:
            check_request(r.prompt_ids, r.params, max_len, vocab_size)
        except RequestError as e:
            raise RequestError(f"request {i}: {e}") from None


def generate(executor: Executor, requests: list[Request], eos_token_ids: frozenset[int], *, num_blocks: int,
             block_size: int, return_logits: bool = False) -> Iterator[TokenEvent]:
    """Yields each request's tokens as they are sampled, one step at a time. The executor's shards
    hold `num_blocks` KV blocks of `block_size` tokens."""
    if blocks_needed(requests, block_size) > num_blocks:
        raise ValueError(f"{blocks_needed(requests, block_size)} KV blocks needed, the replica has {num_blocks}")
    tables, first = [], 0
    for r in requests:
        n = -(-(len(r.prompt_ids) + r.params.max_tokens) // block_size)
        tables.append(list(range(first, first + n)))
        first += n
    outputs: list[list[int]] = [[] for _ in requests]
    chunks = [SeqChunk(i, list(r.prompt_ids), 0, tables[i], r.params, 0) for i, r in enumerate(requests)]
    loop = asyncio.new_event_loop()  # the executor is asynchronous; this driver waits on each step
    try:
        while chunks:
            out = loop.run_until_complete(executor.execute(StepInput(chunks, return_logits=return_logits)))
            following = []
            for row, chunk in enumerate(chunks):
                i, smp = chunk.seq_id, out.samples[chunk.seq_id]
                outputs[i].append(smp.token_id)
                reason = stop_reason(requests[i].params, smp.token_id, len(outputs[i]), eos_token_ids)
                logits = out.logits[row] if out.logits is not None else None
                yield TokenEvent(i, smp.token_id, smp.logprob, reason, logits)
                if reason is None:
                    context = len(requests[i].prompt_ids) + len(outputs[i]) - 1
                    following.append(SeqChunk(i, [smp.token_id], context, tables[i], requests[i].params,
                                              len(outputs[i])))
            chunks = following
    finally:
        loop.close()
