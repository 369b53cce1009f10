"""Prefix caching: the block manager's hash chain, references and LRU eviction alone; the
scheduler with it, driven by the fake paged model of test_scheduler (which reads every token back
through the block tables, so a wrong cached block changes the tokens); and the engine over real
multi-rank replicas, token for token against the cache off and against transformers, under a KV
budget small enough that cached blocks are evicted and sequences preempted."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
from cluster.runtime.processes import LocalReplica
from cluster.engine.kv_cache import block_hashes, BlockManager
from cluster.engine.scheduler import Scheduler
from shard.layout import Layout
from shard.sampler import SamplingParams
from tests.cluster.test_scheduler import EOS, FakeModel, reference
from tests.synthetic import make_llama

BS = 4


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


# ---- the hash chain ----

def test_a_block_hash_covers_its_tokens_and_every_block_before_it():
    tokens = list(range(10, 30))
    chain = block_hashes(tokens, BS)
    assert len(chain) == 5 and len(set(chain)) == 5
    assert block_hashes(tokens + [1, 2, 3], BS) == chain               # a partial block has no hash
    assert block_hashes(tokens[:7], BS) == chain[:1]
    changed = block_hashes([99] + tokens[1:], BS)                        # one token of the first block
    assert all(a != b for a, b in zip(changed, chain))                   # changes every hash after it
    moved = block_hashes(tokens[4:8] * 2, BS)                            # block 1's tokens, twice from the start
    assert moved[0] != chain[1] and moved[1] != moved[0]                 # equal tokens elsewhere: another hash
    known = block_hashes(tokens[:9], BS)
    assert block_hashes(tokens, BS, known) is known and known == chain   # extends a computed prefix in place


# ---- the block manager ----

def test_cached_blocks_are_shared_by_reference_and_stay_cached_when_released():
    pool = BlockManager(range(8), BS)
    chain = block_hashes(list(range(12)), BS)
    a: list[int] = []
    pool.grow(a, 12)
    for block, h in zip(a, chain):
        pool.publish(block, h)
    assert pool.match(chain) == a and pool.num_cached == 3 and pool.num_free == 5
    b: list[int] = []
    pool.take(b, pool.match(chain[:2]))
    pool.grow(b, 9)                                                      # 2 shared blocks and 1 of its own
    assert b[:2] == a[:2] and b[2] not in a and pool.num_free == 4
    pool.check([a, b])
    blocks = list(a)
    pool.free(a)                                                         # a's third block: held by no one
    assert not a and pool.num_free == 5 and pool.match(chain) == blocks and pool.evictable_among(blocks) == 1
    pool.check([b])
    pool.free(b)
    assert pool.num_free == 8 and pool.num_cached == 3                  # free to use, and still cached
    assert len(pool.match(chain)) == 3
    pool.check([])
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free(blocks[:1])


def test_eviction_only_when_free_blocks_run_out_least_recently_used_first_tail_first():
    pool = BlockManager(range(6), BS)
    chains = {name: block_hashes([base + i for i in range(8)], BS) for name, base in (("a", 100), ("b", 200))}
    tables = {}
    for name, chain in chains.items():
        tables[name] = []
        pool.grow(tables[name], 8)
        for block, h in zip(tables[name], chain):
            pool.publish(block, h)
    pool.free(tables["a"])
    pool.free(tables["b"])                                               # released after a: used more recently
    assert pool.num_free == 6 and pool.evictions == 0
    new: list[int] = []
    pool.grow(new, 8)                                                    # the 2 free blocks first
    assert pool.evictions == 0 and len(pool.match(chains["a"])) == 2
    pool.grow(new, 12)                                                   # then a's tail, its last block
    assert pool.evictions == 1 and len(pool.match(chains["a"])) == 1 and len(pool.match(chains["b"])) == 2
    pool.take([], pool.match(chains["a"]))                               # a used again: now newer than b
    pool.grow(new, 16)
    assert pool.evictions == 2 and len(pool.match(chains["b"])) == 1 and len(pool.match(chains["a"])) == 1
    assert pool.recent_hashes(10)[0] == chains["a"][0]


def test_a_block_computed_twice_is_cached_once_and_the_copy_is_freed():
    pool = BlockManager(range(4), BS)
    (h,) = block_hashes([5, 6, 7, 8], BS)
    a, b = [], []
    pool.grow(a, 4)
    pool.grow(b, 4)
    pool.publish(a[0], h)
    pool.publish(b[0], h)                                                # the same prefix, computed at once
    assert pool.match([h]) == a and pool.num_cached == 1
    pool.free(b)
    pool.free(a)
    assert pool.num_free == 4 and pool.num_cached == 1
    pool.drop_cache()                                                    # the replica's KV is gone
    assert pool.num_cached == 0 and pool.match([h]) == [] and pool.num_free == 4
    pool.check([])


def test_with_caching_off_nothing_is_published():
    pool = BlockManager(range(4), BS, caching=False)
    t: list[int] = []
    pool.grow(t, 4)
    pool.publish(t[0], 1)
    assert pool.match([1]) == [] and pool.num_cached == 0


# ---- the scheduler ----

def make(num_blocks=64, lanes=1, max_tokens_per_step=32, max_num_seqs=8, prefix_caching=True) -> Scheduler:
    return Scheduler(num_blocks, BS, max_num_seqs=max_num_seqs, max_tokens_per_step=max_tokens_per_step,
                     max_model_len=1024, eos_token_ids=frozenset({EOS}), lanes=lanes, prefix_caching=prefix_caching)


def run(sched: Scheduler, model: FakeModel, arrivals: dict[int, list[tuple[int, list[int], int]]]):
    """Drives `sched` to the end, checking the blocks after every step; returns the outputs and the
    first chunk of every admission of each sequence (a preempted one is admitted again)."""
    outputs, admitted, step = {}, {}, 0
    while step <= max(arrivals, default=0) or sched.seqs:
        for seq_id, prompt, max_tokens in arrivals.get(step, []):
            sched.add(seq_id, prompt, greedy(max_tokens))
            outputs[seq_id] = []
        running = {s.seq_id for s in sched.seqs.values() if s.running}
        in_flight = [b for lane in range(sched.lanes) if (b := sched.schedule(lane)) is not None]
        for batch in in_flight:
            for chunk in batch.step.seqs:
                if chunk.seq_id not in running:
                    admitted.setdefault(chunk.seq_id, []).append(chunk)
            for u in sched.update(batch, model.run(batch)):
                outputs[u.seq_id].append(u.sample.token_id)
        sched.check_blocks()
        step += 1
        assert step < 10_000
    return outputs, {i: chunks[0] for i, chunks in admitted.items()}, admitted


def test_requests_sharing_prefixes_of_different_lengths_compute_only_what_is_not_cached():
    system = list(range(100, 123))                                       # 23 tokens: 5 full blocks
    sched, model = make(), FakeModel(BS)
    outputs, first, _ = run(sched, model, {0: [(0, system + [1, 2], 3)]})
    assert outputs[0] == reference(system + [1, 2], 3)
    prompts = {1: system[:6] + [7, 8, 9], 2: system[:13] + [7], 3: system + [9], 4: system[:4], 5: [55] + system}
    outputs, first, _ = run(sched, model, {0: [(i, p, 4) for i, p in prompts.items()]})
    for i, p in prompts.items():
        assert outputs[i] == reference(p, 4), i
    # Cached: the full blocks of the shared prefix, but never the block holding the last prompt token.
    assert {i: first[i].context_len for i in prompts} == {1: 4, 2: 12, 3: 20, 4: 0, 5: 0}
    stats = sched.cache_stats()
    assert (stats.requests, stats.hit_requests, stats.hit_tokens) == (6, 3, 36)
    assert stats.prompt_tokens == 25 + sum(map(len, prompts.values()))
    assert sched.num_free_blocks == 64 and stats.cached_blocks > 0


def test_a_waiting_request_owes_only_its_uncached_tokens():
    system = list(range(100, 123))                                       # 23 tokens: 5 full blocks
    sched, model = make(max_num_seqs=1), FakeModel(BS)
    run(sched, model, {0: [(0, system + [1, 2], 3)]})
    sched.add(1, list(range(300, 310)), greedy(40))                      # takes the one batch slot
    sched.schedule(0)
    sched.add(2, system + [7, 8], greedy(2))                             # waits: 20 of its 25 tokens cached
    sched.add(3, [9] * 11, greedy(2))                                    # waits: nothing cached
    assert sched.queued_tokens == (25 - 20) + 11
    sched.prefix_caching = False
    assert sched.queued_tokens == 25 + 11


def test_a_whole_cached_prompt_still_computes_its_last_token():
    sched, model = make(), FakeModel(BS)
    prompt = list(range(200, 209))                                       # 9 tokens: 2 full blocks and 1 token
    run(sched, model, {0: [(0, prompt, 2)]})
    outputs, first, _ = run(sched, model, {0: [(1, prompt, 2), (2, prompt[:8], 2)]})
    assert (first[1].context_len, first[1].token_ids) == (8, prompt[8:])  # only the last token, sampled
    assert first[1].params is not None
    assert (first[2].context_len, first[2].token_ids) == (4, prompt[4:8])  # 8 tokens: the second block again
    assert outputs == {1: reference(prompt, 2), 2: reference(prompt[:8], 2)}


def test_the_next_turn_of_a_conversation_hits_the_previous_answer_too():
    sched, model = make(), FakeModel(BS)
    turn1 = list(range(300, 310))
    out1, _, _ = run(sched, model, {0: [(0, turn1, 9)]})
    turn2 = turn1 + out1[0] + [1, 2, 3]
    out2, first, _ = run(sched, model, {0: [(1, turn2, 5)]})
    # The KV of 18 of the 19 tokens the first turn computed is written (its last output is never
    # fed back); blocks 0-3 are full: 16 tokens, 6 of them from the answer.
    assert first[1].context_len == 16 and out2[1] == reference(turn2, 5)
    # The second turn, which started from cached blocks, publishes the blocks it filled after them.
    turn3 = turn2 + out2[1] + [4]
    out3, first, _ = run(sched, model, {0: [(2, turn3, 3)]})
    assert first[2].context_len == 24 and out3[2] == reference(turn3, 3)   # 26 tokens written: 6 full blocks


def test_chunked_prefill_continues_from_the_cached_prefix():
    sched, model = make(max_tokens_per_step=8, max_num_seqs=4), FakeModel(BS)
    prefix = list(range(400, 420))
    run(sched, model, {0: [(0, prefix + [1], 1)]})
    prompt = prefix + list(range(500, 530))
    sched.add(1, prompt, greedy(2))
    chunks, first_table = [], None
    while sched.seqs:
        batch = sched.schedule()
        chunks += batch.step.seqs
        first_table = first_table or list(batch.step.seqs[0].block_table)  # the live table: copied while it runs
        sched.update(batch, model.run(batch))
    assert [(c.context_len, len(c.token_ids)) for c in chunks] == [(20, 8), (28, 8), (36, 8), (44, 6), (50, 1)]
    assert first_table[:5] == sched.pools[0].match(block_hashes(prefix, BS))
    assert len(first_table) == 7                                         # 5 cached, then 2 of its own for 8 tokens


def test_a_preempted_sequence_resumes_from_its_cached_blocks():
    # 4 blocks: both prompts of 4 tokens start, and each needs a third block at its 9th token. The
    # newest is preempted; of its two released blocks the tail goes to the oldest, the head stays cached.
    sched, model = make(num_blocks=4, max_num_seqs=4), FakeModel(BS)
    a, b = [1, 2, 3, 4], [6, 7, 8, 9]
    outputs, _, admitted = run(sched, model, {0: [(0, a, 6), (1, b, 6)]})
    assert outputs == {0: reference(a, 6), 1: reference(b, 6)}
    assert sched.preemptions == 1 and [c.context_len for c in admitted[1]] == [0, 4]
    resumed = admitted[1][1]
    assert resumed.token_ids == (b + reference(b, 6))[4:resumed.context_len + len(resumed.token_ids)]
    assert sched.cache_stats().hit_requests == 0                         # its own blocks again are no hit


def test_abort_releases_references_and_failure_drops_the_cache():
    sched, model = make(num_blocks=16), FakeModel(BS)
    prompt = list(range(600, 613))
    run(sched, model, {0: [(0, prompt, 2)]})
    for i in (1, 2):
        sched.add(i, prompt, greedy(20))
    batch = sched.schedule()
    assert [c.context_len for c in batch.step.seqs] == [12, 12] and batch.step.seqs[0].block_table[:3] == \
        batch.step.seqs[1].block_table[:3]                              # both hold the same 3 cached blocks
    sched.abort(1)                                                       # in flight: releases its references now
    sched.check_blocks()
    sched.update(batch, model.run(batch))
    sched.abort(2)
    assert not sched.seqs and sched.num_free_blocks == 16 and sched.cache_stats().cached_blocks == 3
    sched.check_blocks()
    sched.add(3, prompt, greedy(2))
    batch = sched.schedule()
    assert batch.step.seqs[0].context_len == 12
    sched.fail_all()                                                     # the replica's KV is gone
    assert sched.cache_stats().cached_blocks == 0 and sched.num_free_blocks == 16
    sched.add(4, prompt, greedy(2))
    assert sched.schedule().step.seqs[0].context_len == 0


def test_caching_off_computes_every_prompt_from_its_first_token():
    sched, model = make(prefix_caching=False), FakeModel(BS)
    prompt = list(range(700, 717))
    run(sched, model, {0: [(0, prompt, 2)]})
    _, first, _ = run(sched, model, {0: [(1, prompt, 2)]})
    assert first[1].context_len == 0 and sched.cache_stats().cached_blocks == 0


def conversations(n=12, seed=0):
    """Arrivals that share a system prompt and repeat earlier prompts with their answers."""
    rng = random.Random(seed)
    system = [rng.randrange(EOS) for _ in range(18)]
    arrivals: dict[int, list] = {}
    for i in range(n):
        prompt = system[: rng.choice([0, 5, 11, 18])] + [rng.randrange(EOS) for _ in range(rng.randint(1, 14))]
        arrivals.setdefault(rng.randint(0, 6), []).append((i, prompt, rng.randint(1, 12)))
        later = prompt + reference(prompt, 12)[: rng.randint(0, 12)] + [rng.randrange(EOS)]
        arrivals.setdefault(rng.randint(8, 40), []).append((100 + i, later, rng.randint(1, 8)))
    return arrivals


@pytest.mark.parametrize("num_blocks,lanes", [(400, 1), (22, 1), (400, 2), (40, 2), (45, 3)])
def test_shared_prefix_workload_matches_reference_and_every_block_is_free_or_cached(num_blocks, lanes):
    arrivals = conversations()
    sched = make(num_blocks=num_blocks, lanes=lanes)
    outputs, _, _ = run(sched, FakeModel(BS), arrivals)
    for reqs in arrivals.values():
        for seq_id, prompt, max_tokens in reqs:
            assert outputs[seq_id] == reference(prompt, max_tokens), seq_id
    stats = sched.cache_stats()
    assert stats.hit_requests > 0 and sched.num_free_blocks == num_blocks and not sched.seqs
    if num_blocks < 100:                                                 # a small budget evicts and preempts
        assert stats.evictions > 0 and sched.preemptions > 0


# ---- the engine over multi-rank replicas ----

def hf_greedy(model_dir, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(new_tokens):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            out.append(ids[len(prompt):])
    return out


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    model_dir = make_llama(tmp_path_factory.mktemp("prefix-llama") / "model", layers=4, heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(3)
    system = torch.randint(3, 1003, (21,), generator=gen).tolist()
    own = [torch.randint(3, 1003, (n,), generator=gen).tolist() for n in (5, 2, 9, 4)]
    # Prefixes of 21, 13, 6 and 0 tokens of the system prompt, then each request's own tokens.
    first = [system + own[0], system[:13] + own[1], system[:6] + own[2], own[3]]
    answers = hf_greedy(model_dir, first, NEW)
    second = [p + a + [7, 8] for p, a in zip(first, answers)]            # the next turns, with the answers
    return model_dir, first, second, answers, hf_greedy(model_dir, second, NEW)


NEW = 10


async def serve_turns(replica, first, second, caching: bool, num_blocks: int):
    engine = Engine(LocalExecutor(replica), replica.cfg, frozenset(), num_blocks=num_blocks, block_size=BS,
                    lanes=replica.layout.pp, max_num_seqs=4, max_tokens_per_step=16, prefix_caching=caching)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)

    async def one(prompt, delay):
        await asyncio.sleep(delay)
        return [u.sample.token_id async for u in engine.generate(prompt, params)]

    got = await asyncio.gather(*(one(p, 0.01 * i) for i, p in enumerate(first)))
    got += await asyncio.gather(*(one(p, 0.01 * i) for i, p in enumerate(second)))
    engine.sched.check_blocks()
    stats = engine.stats()
    await engine.close()
    return got, stats


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_engine_with_cache_gives_the_tokens_of_the_cache_off_and_of_transformers(chat_model, tp, pp):
    model_dir, first, second, answers, follow_ups = chat_model
    # 12 blocks of 4 per lane, what the longest second turn needs alone (38 tokens and 10 more): the
    # turns cannot all hold their KV at once, so cached blocks are evicted and sequences preempted.
    num_blocks = 12 * pp
    with LocalReplica(model_dir, Layout(tp, pp), num_blocks=num_blocks, block_size=BS, progress=False) as replica:
        on, on_stats = asyncio.run(serve_turns(replica, first, second, True, num_blocks))
        off, off_stats = asyncio.run(serve_turns(replica, first, second, False, num_blocks))
    assert on == off == answers + follow_ups
    assert on_stats.prefix_hit_tokens > 0 and on_stats.prefix_evictions > 0 and on_stats.preemptions > 0
    assert off_stats.prefix_hit_tokens == 0
    for stats in (on_stats, off_stats):
        assert stats.free_blocks == stats.num_blocks and stats.running == stats.waiting == 0


# ---- what operators see ----

def test_prometheus_and_status_show_each_replicas_prefix_cache():
    from caravan.v1 import admin_pb2
    from cluster.cli.client import format_status
    from cluster.engine.engine import EngineStats
    from cluster.api.metrics import RouterMetrics

    def stats(hit_tokens, prompt_tokens, evictions):
        return EngineStats(num_blocks=64, free_blocks=60, running=1, waiting=0, steps=9, preemptions=0, failed=None,
                           queued_tokens=0, prefix_cached_blocks=12, prefix_requests=4, prefix_hit_requests=3,
                           prefix_prompt_tokens=prompt_tokens, prefix_hit_tokens=hit_tokens, prefix_evictions=evictions)

    m = RouterMetrics()
    value = m.registry.get_sample_value
    m.observe_replicas({"r0": (True, stats(30, 100, 2))})
    m.observe_replicas({"r0": (True, stats(90, 200, 5))})               # counters grow by what each report adds
    assert value("caravan_prefix_cache_hit_tokens_total", {"replica": "r0"}) == 90
    assert value("caravan_prefix_cache_prompt_tokens_total", {"replica": "r0"}) == 200
    assert value("caravan_prefix_cache_evictions_total", {"replica": "r0"}) == 5
    assert value("caravan_prefix_cache_token_hit_ratio", {"replica": "r0"}) == 0.45
    assert value("caravan_prefix_cache_request_hit_ratio", {"replica": "r0"}) == 0.75
    assert value("caravan_prefix_cache_blocks", {"replica": "r0"}) == 12
    m.observe_replicas({"r0": (True, stats(10, 20, 0))})                # restarted: counts again from its totals
    assert value("caravan_prefix_cache_hit_tokens_total", {"replica": "r0"}) == 100
    m.observe_replicas({})                                               # gone: its series too
    assert value("caravan_prefix_cache_hit_tokens_total", {"replica": "r0"}) is None

    resp = admin_pb2.StatusResponse(replicas=[admin_pb2.ReplicaStatus(
        name="r0", prefix_cache_blocks=12, prefix_cache_requests=4, prefix_cache_hit_requests=3,
        prefix_cache_prompt_tokens=200, prefix_cache_hit_tokens=90, prefix_cache_evictions=5)])
    assert format_status(resp).splitlines()[-1] == (
        "    prefix cache: 12 blocks; hits: 90/200 (45%) prompt tokens, 3/4 (75%) requests; 5 evictions")
