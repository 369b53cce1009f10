"""Speculative decoding: the output is the target's, token for token (greedy and seeded), with every
KV block back afterwards; sampled tokens follow the target's distribution."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
import torch

from cluster.config import SpeculativeSection
from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
from cluster.engine.sequence import Sequence
from cluster.engine.speculative import NgramIndex, SpecState, Speculator
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.sampler import SamplingParams, sample
from shard.worker import ShardWorker
from tests.synthetic import make_llama

SPEC = SpeculativeSection(method="ngram", num_tokens=4, ngram=3, max_batch=64, min_acceptance=0.0)


def test_ngram_lookup_proposes_what_followed_the_latest_earlier_match():
    index = NgramIndex()
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    assert index.propose(tokens, 3, 4) == [4, 5, 9, 2]          # what followed [1, 2, 3] before
    tokens += [7]
    assert index.propose(tokens, 3, 4) == [8, 1, 2, 3]          # [2, 3, 7]; the index was only extended
    assert NgramIndex().propose([5, 6, 7], 3, 4) == []          # nothing seen twice
    assert NgramIndex().propose([5, 6, 5], 3, 2) == [6, 5]      # down to one token; runs into the suffix


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("spec-llama"), layers=2, heads=4, kv_heads=2, intermediate=128,
                      vocab=64)


@pytest.fixture(scope="module")
def worker(model_dir):
    return ShardWorker(model_dir, ParallelContext(Layout()), num_blocks=256, block_size=4, progress=False)


def prompts(n, seed=0):
    """Prompts that repeat themselves, as answers copying from their input do."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(3, 64) for _ in range(rng.randint(3, 8))]
        out.append((phrase * 4)[: rng.randint(8, 30)] + [rng.randrange(3, 64)])
    return out


async def serve(worker, reqs, speculative, num_blocks=256, **kw):
    engine = Engine(LocalExecutor(worker), worker.cfg, frozenset({2}), num_blocks=num_blocks, block_size=4,
                    max_num_seqs=16, max_tokens_per_step=64, speculative=speculative, **kw)

    async def one(prompt, params, delay):
        await asyncio.sleep(delay)
        return [(u.sample.token_id, u.sample.logprob, u.finish_reason) async for u in engine.generate(prompt, params)]

    out = await asyncio.gather(*(one(p, params, 0.002 * i) for i, (p, params) in enumerate(reqs)))
    engine.sched.check_blocks()
    stats = engine.stats()
    await engine.close()
    return out, stats


def run_both(worker, reqs, num_blocks=256, spec=SPEC):
    """Token ids and finish reasons with speculation off and on; logprobs equal to float tolerance (a
    verify chunk computes a position in a different batch shape than a decode does)."""
    off, _ = asyncio.run(serve(worker, reqs, None, num_blocks))
    on, stats = asyncio.run(serve(worker, reqs, spec, num_blocks))
    for a, b in zip(off, on):
        if a[0][1] is not None:
            assert [x[1] for x in a] == pytest.approx([x[1] for x in b], abs=1e-4)
    strip = lambda outs: [[(t, r) for t, _, r in o] for o in outs]  # noqa: E731
    return strip(off), strip(on), stats


@pytest.mark.parametrize("num_blocks", [256, 20])
def test_greedy_and_seeded_output_is_the_same_with_speculation(worker, num_blocks):
    reqs = [(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)) for p in prompts(6)]
    reqs += [(p, SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=24, logprobs=2))
             for i, p in enumerate(prompts(6, seed=1))]
    off, on, stats = run_both(worker, reqs, num_blocks)
    assert on == off
    assert stats.free_blocks == stats.num_blocks and stats.running == stats.waiting == 0
    assert stats.spec_accepted > 0 and stats.spec_emitted > stats.spec_steps  # more than one token a step
    assert (stats.preemptions > 0) == (num_blocks == 20)


def test_stops_and_max_tokens_inside_an_accepted_draft(worker):
    base = [(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)) for p in prompts(4, seed=3)]
    off, _ = asyncio.run(serve(worker, base, None))
    # Stop on a token each answer produces midway, and cut others at every length: wherever the
    # stop falls in a verified chunk, the output ends there.
    reqs = [(p, dataclasses.replace(params, stop_token_ids=frozenset({ids[7][0]}))) for (p, params), ids
            in zip(base, off)]
    reqs += [(p, dataclasses.replace(params, max_tokens=m)) for m in (1, 2, 5, 9) for p, params in base[:2]]
    off, on, stats = run_both(worker, reqs)
    assert on == off and stats.spec_accepted > 0
    assert all(len(o) <= 8 for o in on[:4]) and [len(o) for o in on[4:]] == [1, 1, 2, 2, 5, 5, 9, 9]


def test_opted_out_requests_and_big_batches_do_not_speculate(worker):
    reqs = [(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, speculate=False)) for p in prompts(3)]
    off, on, stats = run_both(worker, reqs)
    assert on == off and stats.spec_steps == 0
    reqs = [(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for p in prompts(6)]
    off, on, stats = run_both(worker, reqs, spec=dataclasses.replace(SPEC, max_batch=1))
    assert on == off  # only while a lane runs a single sequence
    assert stats.spec_steps < sum(len(o) for o in on) / 2


def test_aborted_speculating_requests_free_their_blocks(worker):
    async def run():
        engine = Engine(LocalExecutor(worker), worker.cfg, frozenset(), num_blocks=64, block_size=4,
                        max_num_seqs=8, max_tokens_per_step=64, speculative=SPEC)
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

        async def leave_after(prompt, n):
            got = 0
            async for _ in engine.generate(prompt, params):
                got += 1
                if got >= n:
                    break

        await asyncio.gather(*(leave_after(p, 1 + i) for i, p in enumerate(prompts(6, seed=5))))
        for _ in range(20):  # the last batches return after the requests left
            if not engine.sched.seqs:
                break
            await asyncio.sleep(0.05)
        engine.sched.check_blocks()
        stats = engine.stats()
        await engine.close()
        return stats

    stats = asyncio.run(run())
    assert stats.free_blocks == stats.num_blocks and stats.running == stats.waiting == 0


def test_a_resumed_request_continues_its_seeded_stream(worker):
    """After a replica failure the request comes back as prompt + the tokens already streamed, with
    `output_offset`: the rest is what the uninterrupted request produced, speculation on or off."""
    prompt = prompts(1, seed=7)[0]
    params = SamplingParams(temperature=0.7, seed=11, max_tokens=20, ignore_eos=True)
    whole = asyncio.run(serve(worker, [(prompt, params)], SPEC))[0][0]
    done = [t for t, _, _ in whole[:9]]

    async def resumed():
        engine = Engine(LocalExecutor(worker), worker.cfg, frozenset(), num_blocks=64, block_size=4, max_num_seqs=4,
                        max_tokens_per_step=64, speculative=SPEC)
        rest = dataclasses.replace(params, max_tokens=params.max_tokens - len(done))
        out = [u.sample.token_id async for u in engine.generate(prompt + done, rest, output_offset=len(done))]
        await engine.close()
        return out

    assert done + asyncio.run(resumed()) == [t for t, _, _ in whole]


def copying_chats(model_dir) -> list[list[int]]:
    from cluster.api.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(model_dir)
    texts = ["Repeat exactly: the caravan left the river town before sunrise, while the streets were still wet.",
             "Correct the spelling and write the text out in full: Forty camels carreid salt, copper pots and "
             "bolts of dyed cloth, and the drviers walked beside them.",
             "Quote the sentence about water: At dusk they reached a well. The water was cold and clear."]
    return [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


def test_smollm2_greedy_is_the_same_with_speculation(smollm2_dir):
    worker = ShardWorker(smollm2_dir, ParallelContext(Layout()), num_blocks=64, block_size=16, progress=False)
    reqs = [(p, SamplingParams(temperature=0, max_tokens=24)) for p in copying_chats(smollm2_dir)]
    reqs.append((reqs[0][0], SamplingParams(temperature=0.8, seed=3, max_tokens=24)))

    async def go(spec):
        engine = Engine(LocalExecutor(worker), worker.cfg, frozenset({2}), num_blocks=64, block_size=16,
                        max_num_seqs=8, max_tokens_per_step=256, speculative=spec)
        out = await asyncio.gather(*(_tokens(engine, p, params) for p, params in reqs))
        engine.sched.check_blocks()
        stats = engine.stats()
        await engine.close()
        return out, stats

    off, _ = asyncio.run(go(None))
    on, stats = asyncio.run(go(SPEC))
    assert on == off
    assert stats.free_blocks == stats.num_blocks
    assert stats.spec_emitted / stats.spec_steps > 2  # copying answers accept most drafts


async def _tokens(engine, prompt, params):
    return [u.sample.token_id async for u in engine.generate(prompt, params)]


def _serve_replica(model_dir, layout, reqs, spec, eos):
    from cluster.runtime.processes import LocalReplica
    blocks = 24 * layout.pp

    async def go(replica, speculative):
        engine = Engine(LocalExecutor(replica), replica.worker.cfg, eos, num_blocks=blocks, block_size=16,
                        lanes=layout.pp, max_num_seqs=8, max_tokens_per_step=128, speculative=speculative)
        out = await asyncio.gather(*(_tokens(engine, p, params) for p, params in reqs))
        engine.sched.check_blocks()
        stats = engine.stats()
        await engine.close()
        return out, stats

    with LocalReplica(model_dir, layout, num_blocks=blocks, block_size=16, progress=False) as replica:
        off, _ = asyncio.run(go(replica, None))
        on, stats = asyncio.run(go(replica, spec))
        return off, on, stats


@pytest.mark.slow
def test_smollm2_tp3_pp2_and_synthetic_tp2_pp2_give_the_same_tokens_with_speculation(smollm2_dir, model_dir):
    """Every PP lane verifies drafts; a TP group samples every position of a chunk alike."""
    chats = [(p, SamplingParams(temperature=0, max_tokens=20)) for p in copying_chats(smollm2_dir)]
    off, on, stats = _serve_replica(smollm2_dir, Layout(3, 2), chats, SPEC, frozenset({2}))
    assert on == off and stats.free_blocks == stats.num_blocks and stats.spec_accepted > 0
    reqs = [(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)) for p in prompts(4)]
    off, on, stats = _serve_replica(model_dir, Layout(2, 2), reqs, SPEC, frozenset())
    assert on == off and stats.free_blocks == stats.num_blocks and stats.spec_steps > 0


# ---- the sampled case: the target's distribution, on a small synthetic vocabulary ----

VOCAB = 5


def target_logits(prefix: tuple[int, ...]) -> torch.Tensor:
    """A fixed 'model' over a 5-token vocabulary: the next token's logits depend on the last two."""
    g = torch.Generator().manual_seed(hash(prefix[-2:]) % 2**31)
    return torch.randn(VOCAB, generator=g) * 1.5


def test_sampled_tokens_follow_the_target_distribution():
    """Three tokens after a fixed prompt, drawn many times through draft + verify with a poor proposer
    (it proposes every token often, accepted or not), against the exact joint probabilities of the
    target: a chi-square bound over the 125 outcomes."""
    params = SamplingParams(temperature=0.9, top_k=4, max_tokens=3)
    prompt = (1, 2)
    spec = Speculator(dataclasses.replace(SPEC, num_tokens=2))
    counts: dict[tuple[int, ...], int] = {}
    draws, rng = 6000, random.Random(0)
    for _ in range(draws):
        out: list[int] = []
        while len(out) < 3:
            seq = Sequence(0, list(prompt) + out, len(prompt), params, 0, 0, spec=SpecState())
            seq.draft = [rng.randrange(VOCAB) for _ in range(2 - len(out))]  # 3 tokens at most
            context = tuple(seq.tokens)
            rows = [target_logits(context + tuple(seq.draft[:d])) for d in range(len(seq.draft) + 1)]
            samples = sample(torch.stack(rows), [params] * len(rows), list(range(len(rows))))
            out += [s.token_id for s in (spec.accept(seq, samples) if seq.draft else samples)]
        key = tuple(out[:3])
        counts[key] = counts.get(key, 0) + 1

    def probs(prefix):
        logits = target_logits(prefix) / params.temperature
        keep = logits.topk(params.top_k).indices
        p = torch.zeros(VOCAB)
        p[keep] = logits[keep].softmax(-1)
        return p

    chi2, cells = 0.0, 0
    for a in range(VOCAB):
        pa = probs(prompt)[a]
        for b in range(VOCAB):
            pb = probs(prompt + (a,))[b]
            for c in range(VOCAB):
                expected = draws * float(pa * pb * probs(prompt + (a, b))[c])
                if expected > 0:
                    chi2 += (counts.get((a, b, c), 0) - expected) ** 2 / expected
                    cells += 1
                else:
                    assert (a, b, c) not in counts  # top-k's masked tokens are never emitted
    # 64 reachable outcomes (top 4 of 5 at each of 3 tokens): chi-square with 63 degrees of freedom,
    # whose 99.9th percentile is 103.4.
    assert cells == 64 and chi2 < 103.4, chi2
    assert spec.stats.accepted > 0 and spec.stats.proposed > spec.stats.accepted


def test_prometheus_shows_each_replicas_speculation():
    from cluster.api.metrics import RouterMetrics
    from cluster.engine.engine import EngineStats

    def stats(steps, proposed, accepted):
        return EngineStats(num_blocks=64, free_blocks=64, running=0, waiting=0, steps=9, preemptions=0, failed=None,
                           queued_tokens=0, spec_steps=steps, spec_proposed=proposed, spec_accepted=accepted,
                           spec_emitted=steps + accepted)

    m = RouterMetrics()
    value = m.registry.get_sample_value
    m.observe_replicas({"r0": (True, stats(10, 40, 20))})
    m.observe_replicas({"r0": (True, stats(20, 80, 60))})
    assert value("caravan_speculative_accepted_tokens_total", {"replica": "r0"}) == 60
    assert value("caravan_speculative_proposed_tokens_total", {"replica": "r0"}) == 80
    assert value("caravan_speculative_acceptance_ratio", {"replica": "r0"}) == 0.75
    assert value("caravan_speculative_mean_accepted_length", {"replica": "r0"}) == 4.0
    m.observe_replicas({})
    assert value("caravan_speculative_acceptance_ratio", {"replica": "r0"}) is None
