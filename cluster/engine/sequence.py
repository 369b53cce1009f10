"""What the scheduler keeps of a sequence, and what it hands the engine: a batch for one step and
the tokens it produced. A sequence is held by identity, never compared by value (its token list
grows with its context), and its tokens are one list that each step appends to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shard.sampler import Sample, SamplingParams
from shard.worker import SeqChunk, StepInput

if TYPE_CHECKING:
    from cluster.engine.speculative import SpecState

PENDING = -1   # the input token of a decode scheduled ahead, until `Batch.feed` sets it


@dataclass(eq=False)  # held by identity: equality would compare token lists
class Sequence:
    seq_id: int
    tokens: list[int]                             # the prompt, then each output token appended
    num_prompt: int
    params: SamplingParams
    lane: int
    arrival: int                                  # order of add(); smaller is older
    output_offset: int = 0                        # output tokens produced before the prompt ended (a resume)
    num_computed: int = 0                         # tokens whose K/V are in the cache or in a batch scheduled
    num_written: int = 0                          # of those, tokens written by batches that returned
    pending: int = 0                              # tokens sampled by batches in flight, not in `tokens` yet
    block_table: list[int] = field(default_factory=list)
    chain: list[int] = field(default_factory=list)  # hash chain of its full blocks (`block_hashes`)
    num_published: int = 0                        # blocks of its table already offered to the prefix cache
    counted: bool = False                         # its admission is in the prefix-cache counters
    running: bool = False
    in_flight: int = 0                            # batches holding it (two when one is scheduled ahead)
    done: bool = False                            # finished or aborted; forgotten once no batch holds it
    preemptions: int = 0
    draft: list[int] = field(default_factory=list)  # speculative tokens of its chunk in flight (`speculative`)
    spec: SpecState | None = None                 # what speculation keeps of it; None until it first proposes

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def length(self) -> int:
        """Its tokens, the ones being sampled included."""
        return len(self.tokens) + self.pending

    @property
    def prefill_left(self) -> int:
        """Tokens to compute before this sequence decodes: all of a waiting one's context (a preempted
        one recomputes its output too), what is left of a running one's prompt; 0 once it decodes
        (its one uncomputed token is the decode's input, not prefill work)."""
        left = self.length - self.num_computed
        return 0 if self.running and (self.num_output or self.pending) and left == 1 else left


@dataclass(eq=False)
class Batch:
    """One step's worth of work from one lane; `update` takes it back with the sampled tokens."""

    lane: int
    seqs: list[Sequence]
    step: StepInput
    fed: list[SeqChunk] = field(default_factory=list)   # decodes whose input the batch before samples

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.step.seqs)

    def feed(self, samples: dict[int, Sample]) -> None:
        """Sets the input of the decodes scheduled ahead from the samples of the lane's batch before."""
        for chunk in self.fed:
            chunk.token_ids[0] = samples[chunk.seq_id].token_id


@dataclass
class TokenUpdate:
    seq_id: int
    sample: Sample
    finish_reason: str | None      # "stop", "length", or None while the sequence goes on
