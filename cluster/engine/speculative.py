"""Speculative decoding: more than one token per target step, exactly the target's output.

- Proposal, `method: ngram`: n-gram prompt lookup. The last n tokens of a sequence (prompt + output,
  n from `ngram` down to 1) are looked up among its earlier tokens; the tokens that followed
  their latest earlier occurrence are the draft, up to `num_tokens` of them. No extra model: it pays
  where answers copy from their input (editing, extraction, quoting, code).
- Proposal, `method: draft`: a smaller model sharing the tokenizer decodes `num_tokens` tokens
  greedily (`cluster.engine.draft_model`). The scheduler reserves their places (`PENDING`) as it
  builds the step; the engine has the draft model fill them in before the step is sent.
- Verification: the draft rides in one step as a chunk [last token, d1 .. dk] over the sequence's
  cached context, like a prompt chunk, and the last stage samples a token at each of its k + 1
  positions (`SeqChunk.num_draft`), each exactly as plain decoding would at that output index:
  greedy argmax, or the sampler's draw from the random stream of (seed, output index). Drafts are
  accepted while they equal those samples; then the first sample that differs (or, all accepted,
  the one after the last draft) is emitted too: 1 to k + 1 tokens per step.
- Exactness. Each emitted token is the one plain decoding would have drawn after the same prefix,
  so greedy output is the same token for token, and so is seeded output: speculation on or off,
  whatever the batch, after preemption or a resume. For sampling this is the rejection sampling of
  Leviathan et al. 2023 / Chen et al. 2023 with a deterministic draft: q is a point mass on the
  draft token x, so their rule is "accept with probability min(1, p(x) / q(x)) = p(x), else draw
  from norm(max(0, p - q)), which is p without x". Drawing y ~ p and accepting iff y == x does
  exactly that: P(accept) = p(x), and y given y != x follows p without x.
- Cost control, per step: a lane speculates only while it runs at most `max_batch` sequences (above
  that a step is compute-bound and verification would cost more than it saves), and a sequence whose
  acceptance rate falls below `min_acceptance` rests for `REST_TOKENS` tokens before it tries again.
- KV: a verify chunk takes blocks for its draft; blocks past the accepted tokens go back to the pool
  when it returns, and the prefix cache publishes only blocks of accepted tokens (`num_written`).

No I/O: the scheduler calls `propose` while it builds a step and `accept` when the step returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from cluster.config import SpeculativeSection
from cluster.engine.kv_cache import BlockManager
from cluster.engine.sequence import PENDING
from shard.sampler import Sample

if TYPE_CHECKING:
    from cluster.engine.sequence import Sequence

REST_TOKENS = 32      # tokens a sequence decodes plainly after its acceptance rate fell below the minimum
RATE_WEIGHT = 0.25    # weight of the latest step in a sequence's acceptance rate (an exponential average)


@dataclass(eq=False)
class NgramIndex:
    """Where each n-gram of a sequence's tokens last ended. It is extended by the tokens appended
    since the last lookup, so a lookup costs O(longest) once the prompt is indexed."""

    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 1      # n-grams ending before this position are in `last_end`

    def propose(self, tokens: list[int], longest: int, k: int) -> list[int]:
        end = len(tokens)
        # Index n-grams ending before `end` only: the one ending at `end` is what we look up.
        for e in range(self.indexed, end):
            for n in range(1, min(longest, e) + 1):
                self.last_end[tuple(tokens[e - n:e])] = e
        self.indexed = max(self.indexed, end)
        for n in range(min(longest, end - 1), 0, -1):
            if (e := self.last_end.get(tuple(tokens[end - n:]))) is not None:
                return tokens[e:e + k]
        return []


@dataclass(eq=False)
class SpecState:
    """What speculation keeps of one sequence."""

    index: NgramIndex = field(default_factory=NgramIndex)
    rate: float = 1.0     # its acceptance rate, an exponential average over its decode steps
    resume_at: int = 0    # it proposes again once it has this many output tokens
    drafted: int = 0      # method draft: its first tokens whose KV the draft model's cache holds


@dataclass(frozen=True)
class SpecStats:
    """Counters since the replica started."""

    steps: int = 0        # verify chunks run (one sequence's draft in one step)
    proposed: int = 0     # draft tokens proposed
    accepted: int = 0     # of those, accepted
    emitted: int = 0      # tokens the verify chunks produced (accepted drafts + one per chunk)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify step: 1 + the mean number of drafts accepted."""
        return self.emitted / self.steps if self.steps else 0.0


class Speculator:
    """The scheduler's side of speculative decoding (see the module's docstring)."""

    def __init__(self, cfg: SpeculativeSection):
        self.cfg = cfg
        self.stats = SpecStats()

    def eligible(self, seq: Sequence) -> bool:
        return seq.params.speculate and (seq.spec is None or seq.num_output >= seq.spec.resume_at)

    def active(self, running: Iterable[Sequence], num_running: int) -> bool:
        """Whether a lane running these sequences speculates at its next step: when it runs few
        enough and one of them would propose."""
        return num_running <= self.cfg.max_batch and any(self.eligible(s) for s in running)

    def propose(self, seq: Sequence, budget: int, pool: BlockManager, num_running: int) -> list[int]:
        """Sets and returns the draft of a decoding sequence, none when it rests or nothing matches.
        It fits the step's `budget` and the sequence's max_tokens, in blocks it holds or free ones
        beyond one for each of the lane's `num_running` sequences (no decode preempts for a draft)."""
        spare = max(0, pool.num_free - num_running)
        room = (len(seq.block_table) + spare) * pool.block_size - seq.num_computed - 1
        limit = min(budget, seq.params.max_tokens - seq.num_output - 1, room)
        if limit <= 0 or not self.eligible(seq):
            return []
        state = seq.spec = seq.spec or SpecState()
        cfg = self.cfg
        if cfg.method == "draft":
            seq.draft = [PENDING] * min(cfg.num_tokens, limit)  # the draft model's, filled in before the step runs
        else:
            seq.draft = state.index.propose(seq.tokens, cfg.ngram, min(cfg.num_tokens, limit))
        if not seq.draft:
            self._rate(seq, 0.0)  # a step without a draft gains nothing, and costs the overlap of steps
        return seq.draft

    def accept(self, seq: Sequence, samples: list[Sample]) -> list[Sample]:
        """The tokens a verify chunk produced: its accepted drafts and the sample after them."""
        draft, seq.draft = seq.draft, []
        m = 0
        while m < len(draft) and samples[m].token_id == draft[m]:
            m += 1
        # The draft model's cache holds the drafts it ran (all but the last), valid as far as they were accepted.
        seq.spec.drafted = min(seq.spec.drafted, len(seq.tokens) + m)
        s = self.stats
        self.stats = SpecStats(s.steps + 1, s.proposed + len(draft), s.accepted + m, s.emitted + m + 1)
        self._rate(seq, m / len(draft))
        return samples[:m + 1]

    def _rate(self, seq: Sequence, rate: float) -> None:
        state = seq.spec
        state.rate += RATE_WEIGHT * (rate - state.rate)
        if state.rate < self.cfg.min_acceptance:
            state.rate, state.resume_at = 1.0, seq.num_output + REST_TOKENS
