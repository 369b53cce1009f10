"""Which replica takes a request: the one holding its prefix, else the one with the most free KV capacity.

Serve's default router balances the number of requests in flight, which says little about an LLM
replica: one long prompt can fill a cache that fifty short chats leave half empty. Each replica
reports its engine stats (`ReplicaServer.record_routing_stats`, every
`ROUTING_STATS_PERIOD_S`); a replica's free capacity is

    free KV tokens (free_blocks * block_size) - queued_tokens - tokens routed to it since its report

where queued_tokens are prompt tokens it holds but has not prefilled yet. The last term is this
router's own count: stats are up to a period old, and without it a burst would all land on the
replica that looked emptiest at the last report. A replica whose stats say it failed, or that has
not reported yet, goes last.

Cache-aware: each replica also reports the chain hashes of up to `PREFIX_SUMMARY_BLOCKS` of its
cached KV blocks, most recently used first (`routing_stats`). The router computes the request's
own chain (`cluster.engine.kv_cache.block_hashes`, the engine's) and so each replica's cached prefix of
the request, in tokens. A replica that holds some of it takes the request, the longest prefix
first, unless it is much busier than the others: its free capacity after taking the request
(free capacity - the prompt's uncached tokens) more than `AFFINITY_SLACK` of its whole KV below
the best replica's. Then the turns of a conversation stay where their history is cached while
load is even, and spread once that replica fills up (its queue and what was routed to it since
its report count against it, as above). A replica's prefill of a cached prefix costs nothing, so
only the uncached part of a prompt is charged to it.

`rank_replicas` (the policy), `RoutedSinceReport` (the router's count) and `PrefixSummaries` (the
replicas' cached prefixes) need no Ray; `CapacityRouter` feeds them Serve's view of the replicas.
"""

from __future__ import annotations

import random
from array import array
from typing import Any, Hashable, Mapping, Sequence, TypeVar

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from cluster.engine.kv_cache import block_hashes

K = TypeVar("K", bound=Hashable)

ROUTING_STATS_PERIOD_S = 0.5
PREFIX_SUMMARY_BLOCKS = 2048   # chain hashes a replica reports: 16 KiB (Serve ships and hashes every report),
                               # 32 K tokens of 16-token blocks, the most recently used
AFFINITY_SLACK = 0.25          # a replica holding the prefix wins unless its free capacity is this much
                               # of its KV below the freest replica's
_LOW64 = (1 << 64) - 1


def routing_stats(engine_stats: Mapping[str, Any], block_size: int, cached_hashes: Sequence[int]) -> dict:
    """What a replica reports for routing: its engine stats, block size, and the low 64 bits of the
    chain hashes of its cached blocks (a collision only misroutes, it never reads wrong KV)."""
    summary = array("Q", (h & _LOW64 for h in cached_hashes[:PREFIX_SUMMARY_BLOCKS])).tobytes()
    return {**engine_stats, "block_size": block_size, "prefix_hashes": summary}


def free_capacity(stats: Mapping[str, Any], routed_tokens: int) -> int | None:
    """KV tokens the replica can still take, or None when its stats cannot say (none yet, or failed)."""
    if not stats or stats.get("failed") is not None:
        return None
    return stats["free_blocks"] * stats["block_size"] - stats["queued_tokens"] - routed_tokens


def rank_replicas(replicas: Sequence[tuple[K, Mapping[str, Any], int]],
                  cached_tokens: Mapping[K, int] | None = None) -> list[K]:
    """Keys of `(key, stats, tokens routed since its report)`: replicas holding a cached prefix of
    the request (`cached_tokens`, by key) and not much busier than the freest, longest prefix first;
    then the others, most free capacity first; replicas without usable stats last. Ties keep their
    input order (the caller shuffles to spread them)."""
    cached_tokens = cached_tokens or {}
    scored = [(free_capacity(stats, routed), key, stats) for key, stats, routed in replicas]
    usable = [s for s in scored if s[0] is not None]
    # Capacity left after the request, but for the prompt tokens all replicas would compute alike.
    best = max((capacity + cached_tokens.get(key, 0) for capacity, key, _ in usable), default=0)

    def affinity(capacity: int, key: K, stats: Mapping[str, Any]) -> int:
        hit = cached_tokens.get(key, 0)
        near = capacity + hit >= best - AFFINITY_SLACK * stats["num_blocks"] * stats["block_size"]
        return hit if near else 0

    usable.sort(key=lambda s: (-affinity(*s), -s[0]))  # stable: ties keep their order
    return [key for _, key, _ in usable] + [key for capacity, key, _ in scored if capacity is None]


class PrefixSummaries:
    """The cached block hashes each replica last reported, as sets, and how much of a prompt each
    holds. A replica's chain of the prompt is its block size's; replicas share one per size."""

    def __init__(self) -> None:
        self._blobs: dict[Hashable, bytes] = {}
        self._sets: dict[Hashable, frozenset[int]] = {}

    def update(self, stats: Mapping[Hashable, Mapping[str, Any]]) -> None:
        """Takes every live replica's latest stats; replicas not in `stats` are gone."""
        for key in self._blobs.keys() - stats.keys():
            del self._blobs[key], self._sets[key]
        for key, s in stats.items():
            blob = s.get("prefix_hashes", b"") if s else b""
            if self._blobs.get(key) != blob:
                self._blobs[key], self._sets[key] = blob, frozenset(array("Q", blob))

    def cached_tokens(self, stats: Mapping[Hashable, Mapping[str, Any]], prompt: Sequence[int]) -> dict[Hashable, int]:
        """Replica -> tokens of `prompt`'s longest prefix of full blocks that it reported cached."""
        chains: dict[int, list[int]] = {}
        out = {}
        for key, s in stats.items():
            cached = self._sets.get(key)
            if not cached or not s:
                continue
            size = s["block_size"]
            if size not in chains:
                chains[size] = [h & _LOW64 for h in block_hashes(prompt, size)]
            blocks = 0
            for h in chains[size]:
                if h not in cached:
                    break
                blocks += 1
            if blocks:
                out[key] = blocks * size
        return out


def prompt_ids(request: PendingRequest) -> Sequence[int]:
    """The prompt of a `ReplicaServer.generate(prompt_ids, params)` call; empty for any other call."""
    prompt = request.args[0] if request.args else request.kwargs.get("prompt_ids")
    return prompt if isinstance(prompt, (list, tuple)) else ()


def prompt_tokens(request: PendingRequest) -> int:
    """Prompt length of a `ReplicaServer.generate(prompt_ids, params)` call; 0 for any other call."""
    return len(prompt_ids(request))


class RoutedSinceReport:
    """Prompt tokens routed to each replica since its last stats report. Serve pushes a replica's
    stats only when they changed, so an unchanged report (nothing routed there has arrived yet)
    keeps the count, while a report taken just before a routed request landed drops it early: a
    bounded undercount, until the following report."""

    def __init__(self) -> None:
        self._stats: dict[Hashable, dict] = {}
        self._tokens: dict[Hashable, int] = {}

    def update(self, stats: Mapping[Hashable, Mapping[str, Any]]) -> None:
        """Takes every live replica's latest stats; replicas not in `stats` are gone."""
        for key in self._stats.keys() - stats.keys():
            del self._stats[key]
            self._tokens.pop(key, None)
        for key, s in stats.items():
            if s != self._stats.get(key):
                self._stats[key], self._tokens[key] = dict(s), 0

    def charge(self, key: Hashable, tokens: int) -> None:
        self._tokens[key] = self._tokens.get(key, 0) + tokens

    def __getitem__(self, key: Hashable) -> int:
        return self._tokens.get(key, 0)


class CapacityRouter(RequestRouter):
    """Serve's request router for the replica deployment; it runs in the caller's process, next to
    its deployment handle."""

    def initialize_state(self, **kwargs) -> None:
        self._routed = RoutedSinceReport()
        self._prefixes = PrefixSummaries()

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        stats = {r.replica_id: r.routing_stats for r in replicas}
        self._routed.update(stats)
        self._prefixes.update(stats)
        super().update_replicas(replicas)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))
        prompt = prompt_ids(pending_request) if pending_request is not None else ()
        cached = self._prefixes.cached_tokens({r.replica_id: r.routing_stats for r in shuffled}, prompt)
        ranked = rank_replicas([(r, r.routing_stats, self._routed[r.replica_id]) for r in shuffled],
                               {r: cached[r.replica_id] for r in shuffled if r.replica_id in cached})
        if ranked and pending_request is not None:
            # Charged when chosen rather than when accepted: Serve routes several requests at once,
            # and those chosen meanwhile must already see this one. Its cached prefix costs nothing.
            first = ranked[0].replica_id
            self._routed.charge(first, len(prompt) - cached.get(first, 0))
        return [[r] for r in ranked]
