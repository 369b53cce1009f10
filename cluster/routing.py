"""Which replica takes a request: the one with the most free KV capacity.

Serve's default router balances the number of requests in flight, which says little about an LLM
replica: one long prompt can fill a cache that fifty short chats leave half empty. Each replica
reports its engine stats (`ReplicaServer.record_routing_stats`, every
`ROUTING_STATS_PERIOD_S`); a replica's free capacity is

    free KV tokens (free_blocks * block_size) - queued_tokens - tokens routed to it since its report

where queued_tokens are prompt tokens it holds but has not prefilled yet. The last term is this
router's own count: stats are up to a period old, and without it a burst would all land on the
replica that looked emptiest at the last report. A replica whose stats say it failed, or that has
not reported yet, goes last.

`rank_replicas` (the policy) and `RoutedSinceReport` (the router's count) need no Ray;
`CapacityRouter` feeds them Serve's view of the replicas.
"""

from __future__ import annotations

import random
from typing import Any, Hashable, Mapping, Sequence, TypeVar

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

K = TypeVar("K", bound=Hashable)

ROUTING_STATS_PERIOD_S = 0.5


def free_capacity(stats: Mapping[str, Any], routed_tokens: int) -> int | None:
    """KV tokens the replica can still take, or None when its stats cannot say (none yet, or failed)."""
    if not stats or stats.get("failed") is not None:
        return None
    return stats["free_blocks"] * stats["block_size"] - stats["queued_tokens"] - routed_tokens


def rank_replicas(replicas: Sequence[tuple[K, Mapping[str, Any], int]]) -> list[K]:
    """Keys of `(key, stats, tokens routed since its report)`, most free capacity first; replicas
    without usable stats last. Ties keep their input order (the caller shuffles to spread them)."""
    scored = [(free_capacity(stats, routed), key) for key, stats, routed in replicas]
    usable = sorted((s for s in scored if s[0] is not None), key=lambda s: -s[0])  # stable: ties keep order
    return [key for _, key in usable] + [key for capacity, key in scored if capacity is None]


def prompt_tokens(request: PendingRequest) -> int:
    """Prompt length of a `ReplicaServer.generate(prompt_ids, params)` call; 0 for any other call."""
    prompt = request.args[0] if request.args else request.kwargs.get("prompt_ids")
    return len(prompt) if isinstance(prompt, (list, tuple)) else 0


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

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        self._routed.update({r.replica_id: r.routing_stats for r in replicas})
        super().update_replicas(replicas)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))
        ranked = rank_replicas([(r, r.routing_stats, self._routed[r.replica_id]) for r in shuffled])
        if ranked and pending_request is not None:
            # Charged when chosen rather than when accepted: Serve routes several requests at once,
            # and those chosen meanwhile must already see this one.
            self._routed.charge(ranked[0].replica_id, prompt_tokens(pending_request))
        return [[r] for r in ranked]
