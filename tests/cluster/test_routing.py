"""The routing policy without Ray: replicas ranked by free KV capacity, failed or silent ones last,
and a burst spread by what was routed since the last report."""

from __future__ import annotations

import asyncio

from ray.serve.request_router import PendingRequest

from cluster.routing import RoutedSinceReport, free_capacity, prompt_tokens, rank_replicas
from shard.sampler import SamplingParams


def stats(free_blocks=100, queued_tokens=0, failed=None, block_size=16) -> dict:
    return {"num_blocks": 100, "free_blocks": free_blocks, "running": 0, "waiting": 0, "steps": 0,
            "preemptions": 0, "failed": failed, "queued_tokens": queued_tokens, "block_size": block_size}


def test_free_capacity_is_free_kv_tokens_less_queued_and_routed_prompt_tokens():
    assert free_capacity(stats(free_blocks=10, queued_tokens=30), routed_tokens=50) == 10 * 16 - 30 - 50
    assert free_capacity(stats(failed="shard died"), 0) is None
    assert free_capacity({}, 0) is None


def test_the_replica_with_most_free_capacity_comes_first_and_unusable_ones_last():
    replicas = [("silent", {}, 0), ("full", stats(free_blocks=2), 0), ("failed", stats(failed="step timeout"), 0),
                ("busy", stats(queued_tokens=1000), 0), ("idle", stats(), 0), ("routed", stats(), 300)]
    assert rank_replicas(replicas) == ["idle", "routed", "busy", "full", "silent", "failed"]


def test_ties_keep_their_input_order():
    assert rank_replicas([("b", stats(), 0), ("a", stats(), 0)]) == ["b", "a"]
    assert rank_replicas([("b", {}, 0), ("a", {}, 0)]) == ["b", "a"]


def test_a_burst_between_reports_is_spread_by_the_tokens_routed_since():
    routed = RoutedSinceReport()
    reports = {"a": stats(), "b": stats()}
    routed.update(reports)
    chosen = []
    for _ in range(10):
        best = rank_replicas([(k, s, routed[k]) for k, s in reports.items()])[0]
        routed.charge(best, 100)
        chosen.append(best)
    assert chosen.count("a") == chosen.count("b") == 5
    routed.update(reports)                        # unchanged stats: no report since, the count stays
    assert routed["a"] == routed["b"] == 500
    reports["a"] = stats(free_blocks=70, queued_tokens=20)
    routed.update(reports)                        # a reported: what it got is now in its stats
    assert (routed["a"], routed["b"]) == (0, 500)
    routed.update({"a": reports["a"]})            # b is gone
    assert routed["b"] == 0


def test_prompt_tokens_are_read_from_the_generate_call():
    async def counts():  # a PendingRequest makes an asyncio future, so it needs a running loop
        params = SamplingParams(max_tokens=4)
        calls = [([[1, 2, 3], params], {}), ([], {"prompt_ids": [1, 2], "params": params}), ([], {})]
        return [prompt_tokens(PendingRequest(args, kwargs, metadata=None)) for args, kwargs in calls]

    assert asyncio.run(counts()) == [3, 2, 0]
