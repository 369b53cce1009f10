"""Speculative decoding with a draft model: the target's output token for token, every KV block back,
and the draft's own cache kept in step with each sequence (a draft equal to the target is accepted
nearly always, which it could not be if the draft's KV went stale)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil

import pytest

from cluster.config import ConfigError, ServeConfig, SpeculativeSection
from cluster.deploy.app import model_dir_for
from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
from cluster.engine.sequence import Sequence
from cluster.engine.speculative import SpecState, Speculator
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.sampler import Sample, SamplingParams
from shard.worker import ShardWorker, StepInput
from tests.cluster.test_speculative import prompts
from tests.synthetic import make_llama

DRAFT = SpeculativeSection(method="draft", draft_model="unused-here", num_tokens=3, max_batch=64, min_acceptance=0.0)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("draft")
    target = make_llama(base / "target", layers=2, heads=4, kv_heads=2, intermediate=128, vocab=64)
    other = make_llama(base / "other", layers=1, heads=2, kv_heads=1, intermediate=64, vocab=64, seed=5)
    return target, other


def worker(path, num_blocks):
    return ShardWorker(path, ParallelContext(Layout()), num_blocks=num_blocks, block_size=4, progress=False)


async def serve(target, draft, reqs, spec, num_blocks):
    engine = Engine(LocalExecutor(target, draft), target.cfg, frozenset({2}), num_blocks=num_blocks, block_size=4,
                    max_num_seqs=16, max_tokens_per_step=64, speculative=spec)

    async def one(prompt, params, delay):
        await asyncio.sleep(delay)
        return [u.sample.token_id async for u in engine.generate(prompt, params)]

    out = await asyncio.gather(*(one(p, params, 0.002 * i) for i, (p, params) in enumerate(reqs)))
    engine.sched.check_blocks()
    stats, steps = engine.stats(), engine.draft_steps
    await engine.close()
    return out, stats, steps


@pytest.mark.parametrize("num_blocks", [256, 24])
@pytest.mark.parametrize("which", ["same", "other"])
def test_output_is_the_targets_with_a_draft_model(dirs, which, num_blocks):
    target = worker(dirs[0], num_blocks)
    draft = worker(dirs[0] if which == "same" else dirs[1], num_blocks)
    greedy = [(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)) for p in prompts(6, seed=2)]
    seeded = [(p, SamplingParams(temperature=0.8, seed=i, max_tokens=20, ignore_eos=True))
              for i, p in enumerate(prompts(4, seed=4))]
    off, _, _ = asyncio.run(serve(target, None, greedy + seeded, None, num_blocks))
    on, stats, steps = asyncio.run(serve(target, draft, greedy + seeded, DRAFT, num_blocks))
    assert on == off
    assert stats.free_blocks == stats.num_blocks and stats.running == stats.waiting == 0
    assert stats.spec_steps > 0 and steps >= stats.spec_steps / 16  # one draft forward serves a whole step
    assert (stats.preemptions > 0) == (num_blocks == 24)
    if which == "same":
        # Greedy drafts of the target itself: only the seeded requests' samples may differ from them.
        greedy_only, stats, _ = asyncio.run(serve(target, draft, greedy, DRAFT, num_blocks))
        assert greedy_only == off[:len(greedy)]
        assert stats.spec_accepted >= 0.95 * stats.spec_proposed, stats
        if num_blocks == 256:  # room for every draft: nearly all 3 drafts, and the token after them
            assert stats.spec_emitted / stats.spec_steps > 3.5
    else:
        assert stats.spec_accepted < stats.spec_proposed


def test_stops_inside_a_draft_models_accepted_draft(dirs):
    target, draft = worker(dirs[0], 128), worker(dirs[0], 128)
    base = [(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)) for p in prompts(3, seed=6)]
    off, _, _ = asyncio.run(serve(target, None, base, None, 128))
    reqs = [(p, dataclasses.replace(params, stop_token_ids=frozenset({ids[5]}))) for (p, params), ids in zip(base, off)]
    reqs += [(p, dataclasses.replace(params, max_tokens=m)) for m in (1, 2, 4) for p, params in base[:1]]
    off, _, _ = asyncio.run(serve(target, None, reqs, None, 128))
    on, stats, _ = asyncio.run(serve(target, draft, reqs, DRAFT, 128))
    assert on == off and stats.free_blocks == stats.num_blocks
    assert [len(o) for o in on[3:]] == [1, 2, 4] and all(len(o) <= 6 for o in on[:3])


@pytest.mark.parametrize("samples, drafted", [([8, 4, 1, 1], 4), ([8, 9, 10, 11], 5), ([3, 1, 1, 1], 3)])
def test_the_draft_models_cache_keeps_what_was_accepted(samples, drafted):
    """Prompt [5, 6, 7] and draft [8, 9, 10]: the draft model ran 7, 8 and 9, so its cache holds 5 tokens.
    After verification it keeps the tokens that stayed: the next draft step starts from there."""
    seq = Sequence(0, [5, 6, 7], 3, SamplingParams(temperature=0), 0, 0, spec=SpecState(drafted=5))
    seq.draft = [8, 9, 10]
    spec = Speculator(DRAFT)
    for smp in spec.accept(seq, [Sample(t, None) for t in samples]):
        seq.tokens.append(smp.token_id)
    assert seq.spec.drafted == drafted and seq.tokens[drafted:]  # at least the last token is run again


def test_an_executor_without_a_draft_model_says_so(dirs):
    executor = LocalExecutor(worker(dirs[0], 8))
    with pytest.raises(RuntimeError, match="no draft model"):
        asyncio.run(executor.draft(StepInput([])))


def test_draft_settings_that_cannot_work_name_the_key(dirs, tmp_path):
    with pytest.raises(ConfigError, match="speculative.draft_model: speculative.method is draft but no draft_model"):
        ServeConfig.from_dict({"speculative": {"method": "draft"}})
    with pytest.raises(ConfigError, match="speculative.draft_model: is set but speculative.method is ngram"):
        ServeConfig.from_dict({"speculative": {"method": "ngram", "draft_model": str(dirs[1])}})
    missing = ServeConfig.from_dict({"model": {"path": str(dirs[0])}, "layout": {"tp": 1, "pp": 1},
                                     "speculative": {"method": "draft", "draft_model": str(tmp_path / "absent")}})
    with pytest.raises(ConfigError, match=r"speculative.draft_model: .*absent does not exist; .*shares the model's "):
        model_dir_for(missing, "serve.yaml")
    # A draft with another vocabulary cannot propose the model's tokens.
    wrong = shutil.copytree(dirs[1], tmp_path / "wrong-vocab")
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"vocab_size": 96}))
    bad = dataclasses.replace(missing, speculative=dataclasses.replace(missing.speculative, draft_model=str(wrong)))
    with pytest.raises(ConfigError, match="speculative.draft_model: .*vocabulary has 96 tokens, the model's 64"):
        model_dir_for(bad, "serve.yaml")
    good = dataclasses.replace(missing, speculative=dataclasses.replace(missing.speculative, draft_model=str(dirs[1])))
    assert model_dir_for(good, "serve.yaml") == str(dirs[0])


@pytest.mark.slow
def test_a_synthetic_tp2_pp2_replica_with_a_synthetic_draft_gives_the_same_tokens(dirs):
    """Every PP lane's drafts come from the draft beside rank 0; the TP group verifies them alike."""
    from cluster.runtime.processes import LocalReplica
    layout, blocks = Layout(2, 2), 48
    reqs = [(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)) for p in prompts(4)]
    reqs += [(p, SamplingParams(temperature=0.7, seed=9, max_tokens=16, ignore_eos=True)) for p in prompts(2, seed=8)]

    async def go(replica, spec):
        engine = Engine(LocalExecutor(replica, replica.draft), replica.worker.cfg, frozenset(), num_blocks=blocks,
                        block_size=4, lanes=layout.pp, max_num_seqs=8, max_tokens_per_step=64, speculative=spec)
        out = await asyncio.gather(*(_tokens(engine, p, params) for p, params in reqs))
        engine.sched.check_blocks()
        stats = engine.stats()
        await engine.close()
        return out, stats

    with LocalReplica(dirs[0], layout, num_blocks=blocks, block_size=4, progress=False, draft_model=dirs[1]) as replica:
        off, _ = asyncio.run(go(replica, None))
        on, stats = asyncio.run(go(replica, DRAFT))
    assert on == off and stats.free_blocks == stats.num_blocks and stats.spec_steps > 0


async def _tokens(engine, prompt, params):
    return [u.sample.token_id async for u in engine.generate(prompt, params)]
