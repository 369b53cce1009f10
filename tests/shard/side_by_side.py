"""Two workers given the same greedy steps: the prompts' prefill, then decode steps fed each worker's own
sampled tokens. Every step's logits must agree within 1e-4, and so must its tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shard.sampler import SamplingParams
from shard.worker import SeqChunk, ShardWorker, StepInput


def greedy_side_by_side(workers: Sequence[ShardWorker], prompts: list[list[int]], tables: list[list[int]],
                        steps: int, before: Callable[[int], object] = lambda w: None) -> None:
    """`before(w)` runs ahead of worker w's part of each step (to switch a kernel in or out, say)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    last: list[list[int]] = [[], []]
    for step in range(steps):
        logits = []
        for w, worker in enumerate(workers):
            before(w)
            seqs = [SeqChunk(i, prompts[i] if step == 0 else [last[w][i]],
                             0 if step == 0 else len(prompts[i]) + step - 1, tables[i], greedy, step)
                    for i in range(len(prompts))]
            out = worker.execute(StepInput(seqs, return_logits=True))
            last[w] = [out.samples[i].token_id for i in range(len(prompts))]
            logits.append(out.logits)
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
        assert last[0] == last[1], f"step {step}"
