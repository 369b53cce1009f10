"""Iteration-level scheduling for one replica: which sequences run in the next step, and with
which KV blocks. No I/O and no clock: the engine calls `add`, `schedule`, `update` and `abort`.

- Continuous batching: sequences join and leave the batch at every step.
- A token budget per step: running decodes first (one token each), then prompt chunks in arrival
  order. A prompt longer than what is left of the budget is prefilled in chunks over several
  steps; only its last chunk samples a token.
- Paged KV: blocks are taken as a sequence grows, not reserved for its whole budget. When a
  running sequence needs a block and none is free, the newest sequence of its lane is preempted:
  its blocks are freed and it goes back to the front of the queue, to be recomputed from its
  prompt and the tokens it has produced (seeded sampling is stateless, so it continues the same).
- Lanes: with pipeline parallelism the engine keeps one batch in flight per stage. Each sequence
  belongs to one lane and each batch is built from one lane, so the batches in flight never share
  a sequence, and a lane is scheduled only after its previous batch returned. Each lane owns an
  equal share of the KV blocks: a lane can then always preempt its way to progress, where lanes
  sharing one pool can starve each other (blocks held by batches in flight cannot be taken back).
- Prefix caching (on unless `prefix_caching=False`): a full block whose KV has been written is
  published under the hash of its tokens chained to the blocks before it (`block_hashes`); a
  sequence being admitted takes the cached blocks of its longest cached prefix and computes only
  the rest, at least its last token. Finished, aborted and preempted sequences release their
  blocks, which stay cached until new KV needs them (least recently used first). The cache is per
  lane, since it is made of the lane's blocks; a new sequence goes to the lane that holds most of
  its prompt unless that lane is busier than the others.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from cluster.engine.kv_cache import BlockManager, CacheStats, block_hashes
from cluster.engine.request import RequestError, check_request
from shard.sampler import Sample, SamplingParams, stop_reason
from shard.worker import SeqChunk, StepInput


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    lane: int
    arrival: int                                  # order of add(); smaller is older
    output_ids: list[int] = field(default_factory=list)
    output_offset: int = 0                        # output tokens produced before `prompt_ids` ended (a resume)
    num_computed: int = 0                         # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    chain: list[int] = field(default_factory=list)  # hash chain of its full blocks (`block_hashes`)
    num_published: int = 0                        # blocks of its table already offered to the prefix cache
    counted: bool = False                         # its admission is in the prefix-cache counters
    running: bool = False
    in_flight: bool = False
    aborted: bool = False
    preemptions: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefill_left(self) -> int:
        """Tokens to compute before this sequence decodes: all of a waiting one's context (a preempted
        one recomputes its output too), what is left of a running one's prompt; 0 once it decodes
        (its one uncomputed token is the decode's input, not prefill work)."""
        left = len(self.token_ids) - self.num_computed
        return 0 if self.running and self.output_ids and left == 1 else left


@dataclass
class Batch:
    """One step's worth of work from one lane; `update` takes it back with the sampled tokens."""

    lane: int
    seqs: list[Sequence]
    step: StepInput

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.step.seqs)


@dataclass
class TokenUpdate:
    seq_id: int
    sample: Sample
    finish_reason: str | None      # "stop", "length", or None while the sequence goes on


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, *, max_num_seqs: int, max_tokens_per_step: int,
                 max_model_len: int, eos_token_ids: frozenset[int], lanes: int = 1, vocab_size: int | None = None,
                 prefix_caching: bool = True):
        if max_tokens_per_step < max_num_seqs:
            raise ValueError(f"max_tokens_per_step ({max_tokens_per_step}) must be at least max_num_seqs "
                             f"({max_num_seqs}): a step must hold one decode token of every running sequence")
        if num_blocks < lanes:
            raise ValueError(f"{num_blocks} KV blocks cannot be shared by {lanes} lanes; give the replica more KV memory")
        share = num_blocks // lanes
        self.pools = [BlockManager(range(i * share, (i + 1) * share), block_size, prefix_caching)
                      for i in range(lanes)]
        self.prefix_caching = prefix_caching
        self.num_blocks, self.block_size = share * lanes, block_size
        self.max_num_seqs, self.max_tokens_per_step = max_num_seqs, max_tokens_per_step
        self.max_model_len, self.eos_token_ids, self.vocab_size = max_model_len, eos_token_ids, vocab_size
        self.seqs: dict[int, Sequence] = {}
        self._waiting: list[deque[Sequence]] = [deque() for _ in range(lanes)]
        self._running: list[list[Sequence]] = [[] for _ in range(lanes)]  # in arrival order
        self._arrivals = 0
        self.preemptions = 0
        self._admissions = CacheStats()

    @property
    def lanes(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return sum(len(w) for w in self._waiting)

    @property
    def num_running(self) -> int:
        return sum(len(r) for r in self._running)

    @property
    def num_free_blocks(self) -> int:
        return sum(p.num_free for p in self.pools)

    def cache_stats(self) -> CacheStats:
        return sum((CacheStats(cached_blocks=p.num_cached, evictions=p.evictions) for p in self.pools),
                   self._admissions)

    def cached_hashes(self, limit: int) -> list[int]:
        """Chain hashes of up to `limit` cached blocks over all lanes, most recently used first in each
        lane and the lanes taken in turn: what routing learns of this replica's cache."""
        per_lane = [p.recent_hashes(limit) for p in self.pools]
        mixed = (h for hs in itertools.zip_longest(*per_lane) for h in hs if h is not None)
        return list(itertools.islice(mixed, limit))

    def check_blocks(self) -> None:
        """Asserts that every block is free, cached, or held by a sequence this scheduler knows."""
        for lane, pool in enumerate(self.pools):
            pool.check([s.block_table for s in self.seqs.values() if s.lane == lane])

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens not yet prefilled, over waiting and partially prefilled sequences: the work
        this replica already owes, which a router subtracts from its free KV capacity. A waiting
        sequence owes only what its lane's cache does not hold (as things stand: eviction may take
        some of it back before it is admitted)."""
        owed = 0
        for s in self.seqs.values():
            if s.aborted:
                continue
            left = s.prefill_left
            if left and not s.running and s.num_computed == 0:
                left -= len(self._cached_prefix(s, self.pools[s.lane])) * self.block_size
            owed += left
        return owed

    def add(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, output_offset: int = 0) -> None:
        """Queues a sequence; raises RequestError when it could never run on this replica.
        `output_offset`: tokens of this request's output already produced elsewhere (a request
        resumed after its replica failed; they end `prompt_ids`), so that seeded sampling goes on
        where it stopped."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} is already scheduled")
        check_request(prompt_ids, params, self.max_model_len, self.vocab_size)
        total = len(prompt_ids) + params.max_tokens
        pool = self.pools[0]
        if pool.blocks_for(total) > pool.num_blocks:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) needs "
                               f"{pool.blocks_for(total)} KV blocks, more than the {pool.num_blocks} of one batch "
                               f"lane; lower max_tokens or give the replica more KV memory")
        seq = Sequence(seq_id, list(prompt_ids), params, 0, self._arrivals, output_offset=output_offset)
        if self.prefix_caching:
            block_hashes(seq.prompt_ids, self.block_size, seq.chain)
        # The least busy lane, or one at most one sequence busier that holds more of the prompt
        # (each lane has a cache of its own, over its own blocks).
        load = [len(self._waiting[i]) + len(self._running[i]) for i in range(self.lanes)]
        seq.lane = min((i for i in range(self.lanes) if load[i] <= min(load) + 1),
                       key=lambda i: (-len(self._cached_prefix(seq, self.pools[i])), load[i], i))
        self._arrivals += 1
        self.seqs[seq_id] = seq
        self._waiting[seq.lane].append(seq)

    def abort(self, seq_id: int) -> bool:
        """Drops a sequence and frees its blocks at once. One in flight is forgotten when its batch
        returns (`update`). Its blocks may still be written by the workers until then, which is safe:
        only its lane's batches use them, and the lane schedules nothing before that batch returns.
        False if the id is unknown or done."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            return False
        seq.aborted = True
        if seq.in_flight:
            self.pools[seq.lane].free(seq.block_table)
        else:
            self._finish(seq)
        return True

    def schedule(self, lane: int = 0) -> Batch | None:
        """The next batch of `lane`, or None when it has nothing to run. The lane's previous batch
        must have been returned through `update`."""
        running, waiting, pool = self._running[lane], self._waiting[lane], self.pools[lane]
        assert not any(s.in_flight for s in running), f"lane {lane} still has a batch in flight"
        budget = self.max_tokens_per_step
        chosen: list[tuple[Sequence, int]] = []
        # Running sequences first, as they already hold blocks: decodes, then unfinished prompts,
        # oldest first within each, so that a long prompt never starves the decodes.
        for seq in sorted(running, key=lambda s: (len(s.token_ids) - s.num_computed > 1, s.arrival)):
            if seq not in running:
                continue  # preempted below to make room for an older sequence
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if n == 0:
                continue
            if not self._make_room(seq, seq.num_computed + n, lane):
                continue
            pool.grow(seq.block_table, seq.num_computed + n)
            chosen.append((seq, n))
            budget -= n
        # Then waiting sequences, oldest first; a waiting sequence never preempts a running one.
        # Each starts after its longest cached prefix.
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = waiting[0]
            hit = self._cached_prefix(seq, pool)
            start = len(hit) * self.block_size
            n = min(len(seq.token_ids) - start, budget)
            if pool.missing(hit, start + n) + pool.evictable_among(hit) > pool.num_free:
                break
            waiting.popleft()
            pool.take(seq.block_table, hit)
            seq.num_computed, seq.num_published = start, len(hit)
            self._count_admission(seq, start)
            pool.grow(seq.block_table, start + n)
            seq.running = True
            running.append(seq)
            chosen.append((seq, n))
            budget -= n
        if not chosen:
            return None
        chunks = []
        for seq, n in chosen:
            start, tokens = seq.num_computed, seq.token_ids
            done = start + n == len(tokens)
            chunks.append(SeqChunk(seq.seq_id, tokens[start:start + n], start, list(seq.block_table),
                                   seq.params if done else None, seq.output_offset + len(seq.output_ids)))
            seq.num_computed += n
            seq.in_flight = True
        return Batch(lane, [s for s, _ in chosen], StepInput(chunks))

    def update(self, batch: Batch, samples: dict[int, Sample]) -> list[TokenUpdate]:
        """Takes a batch back with its sampled tokens; returns one update per token produced."""
        updates = []
        for seq, chunk in zip(batch.seqs, batch.step.seqs):
            seq.in_flight = False
            if seq.aborted:
                self._finish(seq)
                continue
            self._publish(seq)
            if chunk.params is None:
                continue  # a prompt chunk before the last one: nothing sampled yet
            smp = samples[seq.seq_id]
            seq.output_ids.append(smp.token_id)
            reason = stop_reason(seq.params, smp.token_id, len(seq.output_ids), self.eos_token_ids)
            updates.append(TokenUpdate(seq.seq_id, smp, reason))
            if reason is not None:
                self._finish(seq)
        return updates

    def fail_all(self) -> list[int]:
        """Forgets every sequence (the replica is gone) and returns their ids."""
        ids = list(self.seqs)
        for seq in list(self.seqs.values()):
            seq.in_flight = False
            self._finish(seq)
        for pool in self.pools:
            pool.drop_cache()  # the KV went with the replica's shards
        return ids

    def _cached_prefix(self, seq: Sequence, pool: BlockManager) -> list[int]:
        """Blocks of `pool` caching the start of `seq`'s tokens; never the block of its last token,
        which must be computed to sample from (and cached blocks are never written)."""
        if not self.prefix_caching:
            return []
        chain = block_hashes(seq.token_ids, self.block_size, seq.chain)
        return pool.match(chain[: (len(seq.token_ids) - 1) // self.block_size])

    def _count_admission(self, seq: Sequence, cached_tokens: int) -> None:
        if not seq.counted:
            seq.counted = True
            self._admissions += CacheStats(requests=1, hit_requests=int(cached_tokens > 0),
                                           prompt_tokens=len(seq.prompt_ids), hit_tokens=cached_tokens)

    def _publish(self, seq: Sequence) -> None:
        """Offers the blocks `seq` filled (prompt or output: the next turn of a chat starts with this
        one's answer) to the prefix cache, once the step that wrote them has returned."""
        full = seq.num_computed // self.block_size
        if not self.prefix_caching or full <= seq.num_published:
            return
        chain = block_hashes(seq.token_ids, self.block_size, seq.chain)
        pool = self.pools[seq.lane]
        for i in range(seq.num_published, full):
            pool.publish(seq.block_table[i], chain[i])
        seq.num_published = full

    def _make_room(self, seq: Sequence, num_tokens: int, lane: int) -> bool:
        """Preempts the lane's newest running sequences until `seq` can grow to `num_tokens`.
        False when `seq` itself was the newest and got preempted."""
        pool = self.pools[lane]
        while pool.missing(seq.block_table, num_tokens) > pool.num_free:
            victim = self._running[lane][-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._running[seq.lane].remove(seq)
        self.pools[seq.lane].free(seq.block_table)  # its published blocks stay cached: it may find them again
        seq.num_computed, seq.num_published, seq.running = 0, 0, False
        seq.preemptions += 1
        self.preemptions += 1
        # Back to the front, ahead of younger waiting sequences, so it resumes first.
        waiting = self._waiting[seq.lane]
        index = next((i for i, w in enumerate(waiting) if w.arrival > seq.arrival), len(waiting))
        waiting.insert(index, seq)

    def _finish(self, seq: Sequence) -> None:
        self.pools[seq.lane].free(seq.block_table)
        if seq.running:
            self._running[seq.lane].remove(seq)
        else:
            self._waiting[seq.lane].remove(seq)
        del self.seqs[seq.seq_id]
