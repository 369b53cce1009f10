"""Speculative decoding with a draft model (`speculative.method: draft`): a smaller Llama sharing
the target's tokenizer (Llama 3.2 1B or 3.1 8B for 405B) proposes each draft by decoding it.

- Where it runs: one unsharded copy beside the replica's first rank (stage 0, TP rank 0), on its
  device, through `Executor.draft`. That rank is the one every step starts on, so the draft's
  tokens are where the verify step begins without another hop, and with PP it would otherwise
  idle while the later stages run. A 1B draft at bf16 is 2.5 GB beside a 405B shard's ~50 GB.
- Its KV cache mirrors the target's: the same block ids and block size, a cache of its own
  (`ShardWorker` over the draft checkpoint, allocated with the target's block count). Each
  sequence's block table serves both models, so the draft needs no block manager of its own, and
  what the scheduler frees (rejected slots, preemption, a finished sequence) the draft loses too.
  `SpecState.drafted` is how far a sequence's tokens are in the draft's cache; a sequence new to
  speculation (or preempted since) catches up from its first token in one draft prefill. Blocks it
  shares through the prefix cache are written again with the same tokens' KV.
- A draft is greedy, k steps of the draft model: the first runs the tokens the draft's cache lacks
  (at least the sequence's last token) and samples d1, each next one decodes the last draft token.
  Verification is the scheduler's as for any proposer (`cluster.engine.speculative`): a greedy
  draft is a point mass, for which accepting while the target's own samples agree is exact.
- Cost: k draft forwards per verify step, each over every speculating sequence of the step at
  once. They run before the step is sent, so with one lane the target waits on them; the draft
  pays where it is some tens of times cheaper than the target and accepted often.

No I/O of its own: the engine awaits `fill(batch, executor)` before it sends a step that has drafts.
"""

from __future__ import annotations

from cluster.engine.executor import Executor
from cluster.engine.sequence import PENDING, Batch, Sequence
from shard.config import ModelConfig
from shard.sampler import SamplingParams
from shard.worker import SeqChunk, StepInput

GREEDY = SamplingParams(temperature=0)


def check_draft(target: ModelConfig, draft: ModelConfig) -> None:
    """Raises ValueError, saying what differs, when `draft` cannot propose for `target`: the two must
    share the token ids (vocabulary and the begin-of-text token) and the draft must hold a context
    as long as the target's."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"its vocabulary has {draft.vocab_size} tokens, the model's {target.vocab_size}; a draft "
                         "must share the model's tokenizer (for Llama 3.1 405B: Llama 3.2 1B or Llama 3.1 8B)")
    if draft.bos_token_id != target.bos_token_id:
        raise ValueError(f"its begin-of-text token is {draft.bos_token_id}, the model's {target.bos_token_id}; a "
                         "draft must share the model's tokenizer")
    if draft.max_position_embeddings < target.max_position_embeddings:
        raise ValueError(f"it holds {draft.max_position_embeddings} positions, fewer than the model's "
                         f"{target.max_position_embeddings}; use a draft with the model's context length")


def wants_drafts(batch: Batch) -> bool:
    return any(seq.draft and seq.draft[0] == PENDING for seq in batch.seqs)


async def fill(batch: Batch, executor: Executor) -> int:
    """Runs the draft model for the batch's sequences whose drafts are still to come (`PENDING`) and
    writes their tokens into each draft and into the end of its verify chunk. Returns the draft
    steps it ran."""
    todo = [(seq, chunk) for seq, chunk in zip(batch.seqs, batch.step.seqs) if seq.draft and seq.draft[0] == PENDING]
    steps = [SeqChunk(seq.seq_id, seq.tokens[seq.spec.drafted:], seq.spec.drafted, seq.block_table, GREEDY)
             for seq, _ in todo]
    j = 0
    while todo:
        out = await executor.draft(StepInput(steps))
        following, more = [], []
        for (seq, chunk), step in zip(todo, steps):
            token = out.samples[seq.seq_id].token_id
            _place(seq, chunk, j, token)
            seq.spec.drafted = step.context_len + len(step.token_ids)
            if j + 1 < len(seq.draft):
                following.append((seq, chunk))
                more.append(SeqChunk(seq.seq_id, [token], seq.spec.drafted, seq.block_table, GREEDY))
        todo, steps = following, more
        j += 1
    return j


def _place(seq: Sequence, chunk: SeqChunk, j: int, token: int) -> None:
    """Draft token `j` of `seq`, in its draft and in its verify chunk (whose last tokens are the draft)."""
    seq.draft[j] = token
    chunk.token_ids[len(chunk.token_ids) - len(seq.draft) + j] = token
