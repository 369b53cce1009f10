"""The schema corpus (tests/cluster/schema_corpus.py, 61 JSON schemas) on SmolLM2, greedy: in one
continuous batch with free-text requests, every constrained answer ends with `stop`, parses and
validates with jsonschema (formats included), and every free-text answer is token for token what
it is alone. In-process at TP 1 x PP 1 (where the engine's report of constrained requests and mask
time is also checked, as the router exports it), and on a local multi-rank replica at TP 3 x PP 2.

The schemas were sized so that this model closes each of them within MAX_TOKENS (how, in the
corpus's docstring); a schema it could not close would end with `length` as a valid prefix, which
test_grammar covers, and would fail here."""

from __future__ import annotations

import asyncio
import json

import pytest

from cluster.api.metrics import RouterMetrics
from cluster.api.tokenizer import Tokenizer
from cluster.engine.engine import Engine, EngineStats
from cluster.engine.executor import LocalExecutor
from cluster.engine.grammar import Constraint, Grammars
from cluster.runtime.processes import LocalReplica
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.sampler import SamplingParams
from shard.worker import ShardWorker
from tests.cluster.schema_corpus import CORPUS, MAX_TOKENS, prompt, validate

NUM_BLOCKS, BLOCK = 768, 16
FREE_TEXT = ["Name three colors.", "What is 2 + 2?", "Say hello in French.", "Tell me a short fact about cats."]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def grammars(smollm2_dir, tok):
    from shard.config import ModelConfig
    return Grammars(smollm2_dir, ModelConfig.from_pretrained(smollm2_dir).vocab_size, tok.eos_token_ids)


def chat(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}])


def serve(worker, tok, grammars, jobs, lanes: int = 1):
    """jobs: (prompt ids, constraint or None), greedy, all at once in one engine over `worker` (a
    ShardWorker or a LocalReplica); each one's updates, and the engine's stats at the end."""
    async def go():
        engine = Engine(LocalExecutor(worker), worker.cfg, tok.eos_token_ids, num_blocks=NUM_BLOCKS,
                        block_size=BLOCK, lanes=lanes, max_num_seqs=96, max_tokens_per_step=1024, grammars=grammars)
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        try:
            async def one(p, c):
                return [u async for u in engine.generate(p, params, constraint=c)]
            return await asyncio.gather(*(one(p, c) for p, c in jobs)), engine.stats()
        finally:
            assert engine.sched.num_free_blocks == engine.sched.num_blocks
            await engine.close()
    return asyncio.run(go())


def check_corpus_in_one_batch(worker, tok, grammars, lanes: int = 1) -> EngineStats:
    constrained = [(chat(tok, prompt(what)), Constraint("json_schema", json.dumps(schema)))
                   for _, what, schema in CORPUS]
    free = [(chat(tok, text), None) for text in FREE_TEXT]
    # Free text interleaved with the schemas, so that every batch mixes masked and unmasked rows.
    jobs = constrained[:20] + free[:2] + constrained[20:40] + free[2:] + constrained[40:]
    out, stats = serve(worker, tok, grammars, jobs, lanes)
    answers = out[:20] + out[22:42] + out[44:]
    failed = []
    for (name, _, schema), updates in zip(CORPUS, answers):
        text = tok.decode([u.sample.token_id for u in updates])
        try:
            assert updates[-1].finish_reason == "stop", f"ended with {updates[-1].finish_reason}"
            validate(json.loads(text), schema)
        except Exception as e:  # not JSON, not valid, or not ended: all reported at once
            failed.append(f"{name}: {text!r}: {str(e).splitlines()[0]}")
    assert not failed, "\n".join(failed)
    mixed = [[u.sample.token_id for u in o] for o in out[20:22] + out[42:44]]
    alone = [[u.sample.token_id for u in o] for (o,), _ in (serve(worker, tok, grammars, [j], lanes) for j in free)]
    assert mixed == alone
    return stats


def test_every_schema_answer_validates_at_tp1_pp1(smollm2_dir, tok, grammars):
    assert len(CORPUS) >= 50
    worker = ShardWorker(smollm2_dir, ParallelContext(Layout()), num_blocks=NUM_BLOCKS, block_size=BLOCK,
                         progress=False)
    stats = check_corpus_in_one_batch(worker, tok, grammars)
    # What the replica reports, and the router exports per replica.
    assert stats.constrained_requests == len(CORPUS) and stats.mask_seconds > 0
    metrics = RouterMetrics()
    metrics.observe_replicas({"r0": (True, stats)})
    value = metrics.registry.get_sample_value
    assert value("caravan_grammar_requests_total", {"replica": "r0"}) == len(CORPUS)
    assert value("caravan_grammar_mask_seconds_total", {"replica": "r0"}) == stats.mask_seconds


@pytest.mark.slow
def test_every_schema_answer_validates_at_tp3_pp2(smollm2_dir, tok, grammars):
    with LocalReplica(smollm2_dir, Layout(3, 2), num_blocks=NUM_BLOCKS, block_size=BLOCK, progress=False) as replica:
        check_corpus_in_one_batch(replica, tok, grammars, lanes=2)
