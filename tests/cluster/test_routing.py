"""The routing policy without Ray: replicas ranked by free KV capacity, failed or silent ones last,
a burst spread by what was routed since the last report, and a replica holding the request's
prefix first unless it is much busier (tests/cluster/test_prefix_routing.py follows conversations)."""

from __future__ import annotations

import asyncio

from ray.serve.request_router import PendingRequest

from cluster.deploy.request_router import free_capacity, PREFIX_SUMMARY_BLOCKS, PrefixSummaries, prompt_tokens, rank_replicas, RoutedSinceReport, routing_stats
from cluster.engine.kv_cache import block_hashes
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


def test_a_replica_holding_the_prefix_comes_first_unless_it_is_much_busier():
    # AFFINITY_SLACK of 100 blocks of 16 tokens: 400 tokens of free capacity, and b need not compute
    # the 64 cached tokens: b keeps the request until it is 464 tokens busier than a.
    even = [("a", stats(), 0), ("b", stats(), 0)]
    assert rank_replicas(even, {"b": 64}) == ["b", "a"]
    assert rank_replicas(even, {"a": 32, "b": 64}) == ["b", "a"]          # the longest prefix first
    assert rank_replicas([("a", stats(), 0), ("b", stats(queued_tokens=460), 0)], {"b": 64}) == ["b", "a"]
    assert rank_replicas([("a", stats(), 0), ("b", stats(queued_tokens=470), 0)], {"b": 64}) == ["a", "b"]
    assert rank_replicas([("a", stats(), 0), ("b", stats(), 470)], {"b": 64}) == ["a", "b"]  # routed there since
    assert rank_replicas([("a", stats(failed="died"), 0), ("b", stats(), 0)], {"a": 64}) == ["b", "a"]


def test_routing_stats_carry_a_bounded_summary_that_prefix_summaries_read_back():
    prompt = list(range(1, 50))                                          # 3 full blocks of 16
    chain = block_hashes(prompt, 16)
    engine = {k: v for k, v in stats().items() if k != "block_size"}
    report = routing_stats(engine, 16, chain[:2] + [7])
    assert report["block_size"] == 16 and report["free_blocks"] == 100 and len(report["prefix_hashes"]) == 3 * 8
    reports = {"a": report, "b": routing_stats(engine, 16, chain[1:]), "c": routing_stats(engine, 16, [])}
    summaries = PrefixSummaries()
    summaries.update(reports)
    assert summaries.cached_tokens(reports, prompt) == {"a": 32}          # b lacks the first block: no prefix
    assert summaries.cached_tokens(reports, prompt[:20]) == {"a": 16}
    reports["b"] = routing_stats(engine, 16, chain)
    summaries.update(reports)
    assert summaries.cached_tokens(reports, prompt) == {"a": 32, "b": 48}
    summaries.update({"a": reports["a"]})                                # b and c are gone
    assert summaries.cached_tokens(reports, prompt) == {"a": 32}
    big = routing_stats(engine, 16, list(range(PREFIX_SUMMARY_BLOCKS + 10)))
    assert len(big["prefix_hashes"]) == 8 * PREFIX_SUMMARY_BLOCKS
