"""One lane's KV blocks and its prefix cache: which blocks are free, held or cached, and the hash
chain that names a block by its tokens and all the tokens before them.

A block is free (nothing worth keeping), held (by one or more sequences), or cached and held by
nobody (evictable, least recently used first). Full blocks whose KV is written are published under
their chain hash; a sequence whose tokens start with published blocks takes them instead of
computing them again. No I/O: the scheduler drives it.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict, deque
from dataclasses import astuple, dataclass
from typing import Sequence as Tokens


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
        if not need:
            return
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

    def shrink(self, table: list[int], num_tokens: int) -> None:
        """Frees the blocks of `table` past the first `num_tokens` tokens (a draft's rejected tokens):
        blocks only its sequence holds, never published, while no step in flight reads them."""
        tail = table[self.blocks_for(num_tokens):]
        del table[len(table) - len(tail):]
        self.free(tail)

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
