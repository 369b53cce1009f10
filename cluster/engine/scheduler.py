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
  a sequence, and a lane's batch starts only after its previous one returned. Each lane owns an
  equal share of the KV blocks: a lane can then always preempt its way to progress, where lanes
  sharing one pool can starve each other (blocks held by batches in flight cannot be taken back).
- Prefix caching (on unless `prefix_caching=False`): a full block whose KV has been written is
  published under the hash of its tokens chained to the blocks before it (`block_hashes`); a
  sequence being admitted takes the cached blocks of its longest cached prefix and computes only
  the rest, at least its last token. Finished, aborted and preempted sequences release their
  blocks, which stay cached until new KV needs them (least recently used first). The cache is per
  lane, since it is made of the lane's blocks; a new sequence goes to the lane that holds most of
  its prompt unless that lane is busier than the others.
- Scheduling ahead: while a lane's batch runs, its next batch can be scheduled. A sequence whose
  token that batch samples decodes it in the next one, from a placeholder that `Batch.feed` fills
  once the running batch returns, so the next step starts before `update`. One whose token in
  flight is its last (max_tokens) is left out; one that stops on a stop token is in it anyway, and
  the token computed for it is dropped, never emitted. Scheduling ahead never preempts: where a
  running sequence would need it, there is no batch ahead.
- Speculative decoding (`speculative`, when configured): a lane with nothing in flight and few
  enough sequences gives a decode a draft of a few tokens, verified in the same step; such a lane
  is not scheduled ahead, since its next inputs are known only once the verification returns.
- Per-step work follows the sequences scheduled and the tokens they run, never their context or
  the batch squared: sequences held by identity, tokens appended to one list, hash chains extended,
  and a chunk hands the worker the sequence's block table itself, not a copy (while a batch holds
  it, it only grows: a released table is replaced, not cleared).
"""

from __future__ import annotations

import itertools
from collections import deque

from cluster.config import SpeculativeSection
from cluster.engine.kv_cache import BlockManager, CacheStats, block_hashes
from cluster.engine.request import RequestError, check_request
from cluster.engine.sequence import PENDING, Batch, Sequence, TokenUpdate
from cluster.engine.speculative import Speculator
from shard.sampler import Sample, SamplingParams, stop_reason
from shard.worker import SeqChunk, StepInput

__all__ = ["Batch", "Scheduler", "Sequence", "TokenUpdate"]

class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, *, max_num_seqs: int, max_tokens_per_step: int,
                 max_model_len: int, eos_token_ids: frozenset[int], lanes: int = 1, vocab_size: int | None = None,
                 prefix_caching: bool = True, speculative: SpeculativeSection | None = None):
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
        self._running: list[dict[Sequence, None]] = [{} for _ in range(lanes)]  # in admission order
        self._batches = [0] * lanes   # batches of each lane in flight
        self._arrivals = 0
        self.preemptions = 0
        self._admissions = CacheStats()
        self.spec = Speculator(speculative) if speculative is not None and speculative.method else None

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
            if s.done:
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
        seq = Sequence(seq_id, list(prompt_ids), len(prompt_ids), params, 0, self._arrivals, output_offset)
        if self.prefix_caching:
            block_hashes(seq.tokens, self.block_size, seq.chain)
        # The least busy lane, or one at most one sequence busier that holds more of the prompt
        # (each lane has a cache of its own, over its own blocks).
        load = [len(self._waiting[i]) + len(self._running[i]) for i in range(self.lanes)]
        seq.lane = min((i for i in range(self.lanes) if load[i] <= min(load) + 1),
                       key=lambda i: (-len(self._cached_prefix(seq, self.pools[i])), load[i], i))
        self._arrivals += 1
        self.seqs[seq_id] = seq
        self._waiting[seq.lane].append(seq)

    def abort(self, seq_id: int) -> bool:
        """Drops a sequence and frees its blocks at once. One in flight is forgotten when its last
        batch returns (`update`). Its blocks may still be written by the workers until then, which is
        safe: only its lane's batches use them, and they run in the order they were scheduled, so a
        batch that reuses the blocks runs after the ones that still hold them. False if the id is
        unknown or done."""
        seq = self.seqs.get(seq_id)
        if seq is None or seq.done:
            return False
        self._retire(seq)
        return True

    def schedule(self, lane: int = 0) -> Batch | None:
        """The next batch of `lane`, or None when it has nothing to run. With the lane's previous batch
        still in flight, the one after it (scheduled ahead: see the module's docstring), or None where
        that would need a preemption; at most two batches of a lane are in flight or ready."""
        running, waiting, pool = self._running[lane], self._waiting[lane], self.pools[lane]
        assert self._batches[lane] < 2, f"lane {lane} still has two batches in flight"
        ahead = self._batches[lane] == 1
        speculate = self.spec is not None and self.spec.active(running, len(running))
        if ahead and speculate:
            return None
        budget = self.max_tokens_per_step
        # Running sequences first, as they already hold blocks: decodes, then unfinished prompts,
        # oldest first within each, so that a long prompt never starves the decodes.
        order = sorted(running, key=lambda s: (s.length - s.num_computed > 1, s.arrival))
        chosen = self._ahead(order, budget, pool) if ahead else self._running_chunks(order, budget, lane, speculate)
        if chosen is None:
            return None
        budget -= sum(n for _, n in chosen)
        # Then waiting sequences, oldest first; a waiting sequence never preempts a running one.
        # Each starts after its longest cached prefix.
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = waiting[0]
            hit = self._cached_prefix(seq, pool)
            start = len(hit) * self.block_size
            n = min(len(seq.tokens) - start, budget)
            if pool.missing(hit, start + n) + pool.evictable_among(hit) > pool.num_free:
                break
            waiting.popleft()
            pool.take(seq.block_table, hit)
            seq.num_computed, seq.num_written, seq.num_published = start, start, len(hit)
            self._count_admission(seq, start)
            pool.grow(seq.block_table, start + n)
            seq.running = True
            running[seq] = None
            chosen.append((seq, n))
            budget -= n
        return self._batch(lane, chosen) if chosen else None

    def _next_chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of a running sequence for the next step: none where the token in flight is its last,
        or where a draft in flight decides what its next input is."""
        if seq.draft or seq.pending and seq.num_output + seq.pending >= seq.params.max_tokens:
            return 0
        return min(seq.length - seq.num_computed, budget)

    def _running_chunks(self, order: list[Sequence], budget: int, lane: int,
                        speculate: bool) -> list[tuple[Sequence, int]]:
        """The running sequences' chunks with nothing in flight: each grows, preempting the lane's
        newest sequences where blocks run out."""
        chosen = []
        for seq in order:
            if not seq.running:
                continue  # preempted below to make room for an older sequence
            n = self._next_chunk(seq, budget)
            if n == 0:
                continue
            if (seq.num_computed + n > len(seq.block_table) * self.block_size  # most decodes have room
                    and not self._make_room(seq, seq.num_computed + n, lane)):
                continue
            if speculate and seq.length - seq.num_computed == 1:
                n += len(self.spec.propose(seq, budget - n, self.pools[lane], len(self._running[lane])))
            self.pools[lane].grow(seq.block_table, seq.num_computed + n)
            chosen.append((seq, n))
            budget -= n
        return chosen

    def _ahead(self, order: list[Sequence], budget: int, pool: BlockManager) -> list[tuple[Sequence, int]] | None:
        """The running sequences' chunks of the batch after the one in flight; None where the free
        blocks cannot hold them all (only a lane with nothing in flight preempts)."""
        chosen = []
        for seq in order:
            if n := self._next_chunk(seq, budget):
                chosen.append((seq, n))
                budget -= n
        if sum(pool.missing(s.block_table, s.num_computed + n) for s, n in chosen) > pool.num_free:
            return None
        for seq, n in chosen:
            pool.grow(seq.block_table, seq.num_computed + n)
        return chosen

    def _batch(self, lane: int, chosen: list[tuple[Sequence, int]]) -> Batch:
        chunks, fed = [], []
        for seq, n in chosen:
            k = len(seq.draft)  # n counts its draft's tokens, whose KV counts as computed once accepted
            start, end = seq.num_computed, seq.num_computed + n - k
            sampled = end == seq.length
            ahead = end > len(seq.tokens)  # a decode of the token the batch in flight samples
            chunk = SeqChunk(seq.seq_id, [PENDING] if ahead else seq.tokens[start:end] + seq.draft, start,
                             seq.block_table, seq.params if sampled else None,
                             seq.output_offset + seq.num_output + seq.pending, k)
            chunks.append(chunk)
            if ahead:
                fed.append(chunk)
            seq.num_computed = end
            seq.pending += sampled
            seq.in_flight += 1
        self._batches[lane] += 1
        return Batch(lane, [s for s, _ in chosen], StepInput(chunks), fed)

    def update(self, batch: Batch, samples: dict[int, Sample],
               verified: dict[int, list[Sample]] | None = None) -> list[TokenUpdate]:
        """Takes a batch back with its sampled tokens (`verified`: those of every position of the
        chunks with a draft); returns one update per token produced. A sequence done meanwhile
        (aborted, or stopped by the batch before) gets none."""
        self._batches[batch.lane] -= 1
        updates = []
        for seq, chunk in zip(batch.seqs, batch.step.seqs):
            seq.in_flight -= 1
            seq.pending -= chunk.params is not None
            if seq.done:
                self._retire(seq)
                continue
            if chunk.num_draft:
                updates += self._verified(seq, verified[seq.seq_id])
                continue
            seq.num_written = chunk.context_len + len(chunk.token_ids)
            if seq.num_written // self.block_size > seq.num_published:
                self._publish(seq)
            if chunk.params is None:
                continue  # a prompt chunk before the last one: nothing sampled yet
            smp = samples[seq.seq_id]
            seq.tokens.append(smp.token_id)
            reason = stop_reason(seq.params, smp.token_id, seq.num_output, self.eos_token_ids)
            updates.append(TokenUpdate(seq.seq_id, smp, reason))
            if reason is not None:
                self._retire(seq)
        return updates

    def _verified(self, seq: Sequence, samples: list[Sample]) -> list[TokenUpdate]:
        """A verify chunk's tokens (its accepted drafts and the one after them, up to a stop); its
        blocks past them go back to the pool, and only blocks of accepted tokens are published."""
        updates, reason = [], None
        for smp in self.spec.accept(seq, samples):
            seq.tokens.append(smp.token_id)
            reason = stop_reason(seq.params, smp.token_id, seq.num_output, self.eos_token_ids)
            updates.append(TokenUpdate(seq.seq_id, smp, reason))
            if reason is not None:
                break
        seq.num_computed = seq.num_written = len(seq.tokens) - 1  # the last token is the next input
        self._publish(seq)
        if reason is not None:
            self._retire(seq)
            return updates
        assert not seq.in_flight, "a sequence with a draft was scheduled ahead"
        self.pools[seq.lane].shrink(seq.block_table, len(seq.tokens))
        return updates

    def fail_all(self) -> list[int]:
        """Forgets every sequence (the replica is gone) and returns their ids."""
        ids = list(self.seqs)
        for seq in list(self.seqs.values()):
            self._retire(seq)
            self.seqs.pop(seq.seq_id, None)
        self._batches = [0] * self.lanes
        for pool in self.pools:
            pool.drop_cache()  # the KV went with the replica's shards
        return ids

    def _cached_prefix(self, seq: Sequence, pool: BlockManager) -> list[int]:
        """Blocks of `pool` caching the start of `seq`'s tokens; never the block of its last token,
        which must be computed to sample from (and cached blocks are never written)."""
        if not self.prefix_caching:
            return []
        chain = block_hashes(seq.tokens, self.block_size, seq.chain)
        return pool.match(chain[: (len(seq.tokens) - 1) // self.block_size])

    def _count_admission(self, seq: Sequence, cached_tokens: int) -> None:
        if not seq.counted:
            seq.counted = True
            self._admissions += CacheStats(requests=1, hit_requests=int(cached_tokens > 0),
                                           prompt_tokens=seq.num_prompt, hit_tokens=cached_tokens)

    def _publish(self, seq: Sequence) -> None:
        """Offers the blocks `seq` filled (prompt or output: the next turn of a chat starts with this
        one's answer) to the prefix cache, once the step that wrote them has returned. The chain
        grows by the blocks filled since the last call only."""
        full = seq.num_written // self.block_size
        if not self.prefix_caching or full <= seq.num_published:
            return
        chain = block_hashes(seq.tokens, self.block_size, seq.chain)
        pool = self.pools[seq.lane]
        for i in range(seq.num_published, full):
            pool.publish(seq.block_table[i], chain[i])
        seq.num_published = full

    def _make_room(self, seq: Sequence, num_tokens: int, lane: int) -> bool:
        """Preempts the lane's newest running sequences until `seq` can grow to `num_tokens`.
        False when `seq` itself was the newest and got preempted."""
        pool = self.pools[lane]
        while pool.missing(seq.block_table, num_tokens) > pool.num_free:
            victim = next(reversed(self._running[lane]))
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        del self._running[seq.lane][seq]
        self._release(seq)  # its published blocks stay cached: it may find them again
        seq.num_computed, seq.num_written, seq.num_published, seq.running = 0, 0, 0, False
        if seq.spec is not None:
            seq.spec.drafted = 0  # its blocks are gone, and with them the draft model's KV of it
        seq.preemptions += 1
        self.preemptions += 1
        # Back to the front, ahead of younger waiting sequences, so it resumes first.
        waiting = self._waiting[seq.lane]
        index = next((i for i, w in enumerate(waiting) if w.arrival > seq.arrival), len(waiting))
        waiting.insert(index, seq)

    def _release(self, seq: Sequence) -> None:
        """Frees its blocks. The table is replaced, not cleared: chunks in flight hold it."""
        table, seq.block_table = seq.block_table, []
        self.pools[seq.lane].free(list(table) if seq.in_flight else table)

    def _retire(self, seq: Sequence) -> None:
        """Ends a finished or aborted sequence: its blocks at once, the sequence itself once no batch
        in flight holds it."""
        if not seq.done:
            seq.done = True
            self._release(seq)
            if seq.running:
                del self._running[seq.lane][seq]
                seq.running = False
            else:
                self._waiting[seq.lane].remove(seq)
        if not seq.in_flight:
            self.seqs.pop(seq.seq_id, None)
