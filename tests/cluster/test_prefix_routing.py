"""Cache-aware routing over two replicas: the turns of a conversation go to the replica that holds
its history while the load is even, and spread when that replica is saturated. First with replicas
made of the scheduler and the fake paged model (what each replica reports is what its block
manager really holds), then end to end with two engines over a real (synthetic) model."""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict

import pytest

from cluster.engine.engine import Engine

from cluster.engine.executor import LocalExecutor
from cluster.deploy.request_router import PREFIX_SUMMARY_BLOCKS, PrefixSummaries, rank_replicas, RoutedSinceReport, routing_stats
from cluster.engine.scheduler import Scheduler
from shard.config import ModelConfig
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.sampler import SamplingParams
from shard.worker import ShardWorker
from tests.cluster.test_scheduler import EOS, FakeModel
from tests.synthetic import make_llama

BS = 4


class FakeReplica:
    """A scheduler and the fake model: runs what it is given to the end, reports as a replica does."""

    def __init__(self, num_blocks: int = 64):
        self.sched = Scheduler(num_blocks, BS, max_num_seqs=8, max_tokens_per_step=64, max_model_len=4096,
                               eos_token_ids=frozenset({EOS}))
        self.model, self.ids = FakeModel(BS), 0

    def submit(self, prompt: list[int], max_tokens: int) -> int:
        self.ids += 1
        self.sched.add(self.ids, prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
        return self.ids

    def run(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        while (batch := self.sched.schedule()) is not None:
            for u in self.sched.update(batch, self.model.run(batch)):
                out.setdefault(u.seq_id, []).append(u.sample.token_id)
        return out

    def report(self) -> dict:
        s = self.sched
        engine = {"num_blocks": s.num_blocks, "free_blocks": s.num_free_blocks, "queued_tokens": s.queued_tokens,
                  "failed": None}
        return routing_stats(engine, BS, s.cached_hashes(PREFIX_SUMMARY_BLOCKS))


class Router:
    """The policy as `CapacityRouter` applies it (candidates shuffled, so ties go either way), over
    reports read when asked to."""

    def __init__(self, replicas: dict[str, FakeReplica], cache_aware: bool = True, seed: int = 0):
        self.replicas, self.cache_aware, self.rng = replicas, cache_aware, random.Random(seed)
        self.routed, self.prefixes = RoutedSinceReport(), PrefixSummaries()
        self.refresh()

    def refresh(self) -> None:
        self.reports = {k: r.report() for k, r in self.replicas.items()}
        self.routed.update(self.reports)
        self.prefixes.update(self.reports)

    def route(self, prompt: list[int]) -> str:
        cached = self.prefixes.cached_tokens(self.reports, prompt) if self.cache_aware else {}
        candidates = self.rng.sample(list(self.reports.items()), len(self.reports))
        best = rank_replicas([(k, s, self.routed[k]) for k, s in candidates], cached)[0]
        self.routed.charge(best, len(prompt) - cached.get(best, 0))
        return best


def chats(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(EOS) for _ in range(rng.randint(20, 40))] for _ in range(n)]


def test_each_conversation_stays_on_one_replica_while_the_load_is_even():
    replicas = {"a": FakeReplica(), "b": FakeReplica()}
    router = Router(replicas)
    histories = chats(4)
    placed: list[list[str]] = [[] for _ in histories]
    for turn in range(4):
        # Every conversation sends its next turn at once; the replicas then run them all.
        sent = {}
        for i, history in enumerate(histories):
            where = router.route(history)
            placed[i].append(where)
            sent[i] = (where, replicas[where].submit(history, 6))
        outputs = {k: r.run() for k, r in replicas.items()}
        for i, (where, seq_id) in sent.items():
            histories[i] = histories[i] + outputs[where][seq_id] + [turn + 1, turn + 2]
        router.refresh()
    assert all(len(set(p)) == 1 for p in placed), placed                # each conversation on one replica
    assert {p[0] for p in placed} == {"a", "b"}                          # and the conversations spread
    for r in replicas.values():
        stats = r.sched.cache_stats()
        assert stats.hit_requests == 3 * stats.requests // 4            # every turn after the first hits


def test_turns_spread_when_the_replica_holding_them_is_saturated():
    replicas = {"a": FakeReplica(num_blocks=128), "b": FakeReplica(num_blocks=128)}
    router = Router(replicas)
    (history,) = chats(1, seed=1)
    first = router.route(history)
    other = "b" if first == "a" else "a"
    seq_id = replicas[first].submit(history, 6)
    history += replicas[first].run()[seq_id] + [1, 2]
    router.refresh()
    assert router.route(history) == first                                # even load: back to its cache
    replicas[first].submit([5] * 60, 4)                                  # busier, but within the slack
    router.refresh()
    assert router.route(history) == first
    for _ in range(4):                                                   # then a queue builds up there
        replicas[first].submit([5] * 120, 4)
    router.refresh()
    assert router.route(history) == other                                # saturated: the idle one takes it
    assert router.route(history) == other


def test_least_loaded_routing_scatters_conversations_that_cache_aware_routing_keeps():
    def hit_rate(cache_aware: bool) -> float:
        replicas = {"a": FakeReplica(), "b": FakeReplica()}
        router = Router(replicas, cache_aware)
        histories = chats(6, seed=2)
        for turn in range(4):
            sent = {i: (w := router.route(h), replicas[w].submit(h, 6)) for i, h in enumerate(histories)}
            outputs = {k: r.run() for k, r in replicas.items()}
            for i, (where, seq_id) in sent.items():
                histories[i] = histories[i] + outputs[where][seq_id] + [7]
            router.refresh()
        hits = [r.sched.cache_stats() for r in replicas.values()]
        return sum(h.hit_tokens for h in hits) / sum(h.prompt_tokens for h in hits)

    assert hit_rate(True) > hit_rate(False) + 0.1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("routing-llama"), layers=2, heads=4, kv_heads=2, intermediate=128)


def test_two_engines_conversations_stay_and_hit_their_cache(model_dir):
    """End to end in one process: two engines, each over its own shard, routed by their own reports."""
    async def run():
        engines = {k: Engine(LocalExecutor(ShardWorker(model_dir, ParallelContext(Layout()), num_blocks=128,
                                                       block_size=BS, progress=False)),
                             ModelConfig.from_pretrained(model_dir), frozenset(), num_blocks=128, block_size=BS,
                             max_num_seqs=8, max_tokens_per_step=64, name=k) for k in ("a", "b")}
        routed, prefixes = RoutedSinceReport(), PrefixSummaries()
        histories = [[3 + (7 * i + j) % 900 for j in range(30 + i)] for i in range(4)]
        placed: list[list[str]] = [[] for _ in histories]
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        for turn in range(3):
            reports = {k: routing_stats(asdict(e.stats()), BS, e.sched.cached_hashes(PREFIX_SUMMARY_BLOCKS))
                       for k, e in engines.items()}
            routed.update(reports)
            prefixes.update(reports)

            async def one(i: int) -> None:
                cached = prefixes.cached_tokens(reports, histories[i])
                where = rank_replicas([(k, s, routed[k]) for k, s in reports.items()], cached)[0]
                routed.charge(where, len(histories[i]) - cached.get(where, 0))
                placed[i].append(where)
                out = [u.sample.token_id async for u in engines[where].generate(histories[i], params)]
                histories[i] = histories[i] + out + [turn + 11]

            await asyncio.gather(*(one(i) for i in range(len(histories))))
        stats = {k: e.stats() for k, e in engines.items()}
        for e in engines.values():
            await e.close()
        return placed, stats

    placed, stats = asyncio.run(run())
    assert all(len(set(p)) == 1 for p in placed) and {p[0] for p in placed} == {"a", "b"}, placed
    for s in stats.values():
        assert s.prefix_hit_requests == 2 * s.prefix_requests // 3 and s.prefix_hit_tokens > 0
        assert s.free_blocks == s.num_blocks
