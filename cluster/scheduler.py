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

import hashlib
import itertools
from array import array
from collections import OrderedDict, deque
from dataclasses import astuple, dataclass, field
from typing import Sequence as Tokens

from cluster.offline import RequestError, check_request
from shard.sampler import Sample, SamplingParams, stop_reason
from shard.worker import SeqChunk, StepInput


def block_hashes(token_ids: Tokens[int], block_size: int, known: list[int] | None = None) -> list[int]:
    """The hash chain of the full blocks of `token_ids`: block i's hash covers its tokens and block
    i-1's hash, so equal hashes mean equal tokens at equal positions, from the first token on: the
    same KV. `known` is a prefix of the chain already computed; it is extended in place and returned.
    128-bit BLAKE2b, because a collision would hand one request another's KV."""
    chain = [] if known is None else known
    prev = chain[-1].to_bytes(16, "little") if chain else b""
    for start in range(len(chain) * block_size, len(token_ids) - block_size + 1, block_size):
        digest = hashlib.blake2b(prev, digest_size=16)
        digest.update(array("q", token_ids[start:start + block_size]).tobytes())
        prev = digest.digest()
        chain.append(int.from_bytes(prev, "little"))
    return chain


@dataclass(frozen=True)
class CacheStats:
    """Prefix-cache counters of one replica since it started. Hits are counted when a request is first
    admitted (a preempted one that finds its own blocks again is not a hit)."""

    cached_blocks: int = 0        # blocks holding a cached full block, whether a sequence holds them or not
    requests: int = 0             # requests admitted
    hit_requests: int = 0         # of those, requests that found at least one block cached
    prompt_tokens: int = 0        # their prompt tokens
    hit_tokens: int = 0           # of those, tokens whose KV came from the cache
    evictions: int = 0            # cached blocks taken back for new KV

    def __add__(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(*(a + b for a, b in zip(astuple(self), astuple(other))))


class BlockManager:
    """One lane's share of the replica's KV blocks, with a prefix cache.

    A block is free (nothing worth keeping), held (by one or more sequences: `_refs`), or cached
    and held by nobody (`_evictable`, least recently used first). Full blocks whose KV is written
    are published under their chain hash (`publish`); a sequence whose tokens start with published
    blocks takes them (`take`) instead of computing them again. New blocks come from the free list
    first and only then from the evictable ones, oldest first, so the cache keeps everything it can.
    Cached blocks are only ever read: a sequence writes only blocks it got from `grow`."""

    def __init__(self, block_ids: range, block_size: int, caching: bool = True):
        self.num_blocks, self.block_size, self.caching = len(block_ids), block_size, caching
        self._free = deque(block_ids)
        self._refs: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._by_hash: OrderedDict[int, int] = OrderedDict()  # chain hash -> block, least recently used first
        self._hash_of: dict[int, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks `grow` can hand out: free ones and cached ones no sequence holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing(self, table: list[int], num_tokens: int) -> int:
        """Blocks to add to `table` so that it holds `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def match(self, chain: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of `chain`, without taking them."""
        blocks = []
        for h in chain:
            if (block := self._by_hash.get(h)) is None:
                break
            blocks.append(block)
        return blocks

    def evictable_among(self, blocks: list[int]) -> int:
        """How many of `blocks` nobody holds: taking them uses up that many of `num_free`."""
        return sum(b in self._evictable for b in blocks)

    def take(self, table: list[int], blocks: list[int]) -> None:
        """Appends cached `blocks` (from `match`) to `table`, holding them."""
        for b in blocks:
            self._evictable.pop(b, None)
            self._refs[b] = self._refs.get(b, 0) + 1
            self._by_hash.move_to_end(self._hash_of[b])
        table.extend(blocks)

    def grow(self, table: list[int], num_tokens: int) -> None:
        need = self.missing(table, num_tokens)
        assert need <= self.num_free, "grow() past the free blocks; check missing() first"
        for _ in range(need):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
                self.evictions += 1
            self._refs[b] = 1
            table.append(b)

    def publish(self, block: int, chain_hash: int) -> None:
        """Makes a held block's KV (now written) findable by its chain hash. A block with that hash
        already cached (two sequences computed the same prefix at once) stays the one found; this
        one stays private and is freed with its sequence."""
        if self.caching and chain_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[chain_hash] = block
            self._hash_of[block] = chain_hash

    def free(self, table: list[int]) -> None:
        """Releases a sequence's blocks: cached ones nobody else holds become evictable, last block
        first, so that a sequence's tail goes before the prefix it shares with others."""
        for b in reversed(table):
            assert b in self._refs, f"block {b} was freed twice"
            refs = self._refs.pop(b) - 1
            if refs:
                self._refs[b] = refs
            elif b in self._hash_of:
                self._evictable[b] = None
            else:
                self._free.append(b)
        table.clear()

    def drop_cache(self) -> None:
        """Forgets every cached block (the KV is gone: the replica failed). Only once nothing is held."""
        assert not self._refs, "drop_cache() while sequences hold blocks"
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._by_hash.clear()
        self._hash_of.clear()

    def recent_hashes(self, limit: int) -> list[int]:
        """Chain hashes of up to `limit` cached blocks, most recently used first."""
        return list(itertools.islice(reversed(self._by_hash), limit))

    def check(self, tables: list[list[int]]) -> None:
        """Asserts that every block is exactly one of free, held or evictable, that the held ones are
        held by exactly `tables` (the block tables of the lane's sequences), and that every cached
        block is held or evictable: no block leaked."""
        free, held, idle = set(self._free), set(self._refs), set(self._evictable)
        assert len(free) + len(held) + len(idle) == self.num_blocks == len(free | held | idle), "a block leaked"
        refs: dict[int, int] = {}
        for b in itertools.chain.from_iterable(tables):
            refs[b] = refs.get(b, 0) + 1
        assert refs == self._refs, f"blocks held {self._refs}, by the sequences' tables {refs}"
        assert set(self._hash_of) <= held | idle and idle <= set(self._hash_of)
        assert all(self._hash_of[b] == h for h, b in self._by_hash.items())


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

    def has_work(self, lane: int) -> bool:
        return bool(self._waiting[lane] or self._running[lane])

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
