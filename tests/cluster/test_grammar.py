"""Constrained decoding in the engine, on SmolLM2: outputs match their schema, regex or grammar in
one continuous batch with free text (whose tokens the masks never touch), through preemption, and a
request resumed after its streamed tokens goes on exactly (greedy and seeded)."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from cluster.api.tokenizer import Tokenizer
from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
from cluster.engine.grammar import Constraint, GrammarError, Grammars
from cluster.engine.request import RequestError
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.sampler import SamplingParams, apply_bitmasks, sample
from shard.worker import ShardWorker

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def worker(smollm2_dir):
    return ShardWorker(smollm2_dir, ParallelContext(Layout()), num_blocks=256, block_size=16, progress=False)


@pytest.fixture(scope="module")
def grammars(smollm2_dir, tok, worker):
    return Grammars(smollm2_dir, worker.cfg.vocab_size, tok.eos_token_ids)


def run(worker, grammars, tok, jobs, num_blocks=256):
    """jobs: (prompt ids, params, constraint, output_offset); the token ids of each, all in one engine."""
    async def go():
        engine = Engine(LocalExecutor(worker), worker.cfg, tok.eos_token_ids, num_blocks=num_blocks, block_size=16,
                        max_num_seqs=16, max_tokens_per_step=256, grammars=grammars)
        try:
            async def one(p, params, c, offset):
                return [u.sample.token_id async for u in engine.generate(p, params, offset, constraint=c)]
            return await asyncio.gather(*(one(*j) for j in jobs))
        finally:
            assert engine.sched.num_free_blocks == engine.sched.num_blocks
            await engine.close()
    return asyncio.run(go())


def chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}])


def test_constrained_and_free_text_in_one_batch(worker, grammars, tok):
    p = chat(tok, "Describe a person as JSON.")
    greedy = SamplingParams(temperature=0, max_tokens=48)
    jobs = [(p, greedy, Constraint("json_schema", json.dumps(PERSON)), 0), (p, greedy, None, 0),
            (p, SamplingParams(temperature=0.9, seed=7, max_tokens=48), Constraint("json_schema", json.dumps(PERSON)), 0),
            (chat(tok, "Is the sky blue?"), greedy, Constraint("regex", r"(yes|no)\."), 0),
            (p, greedy, Constraint("json_object"), 0),
            (p, greedy, Constraint("grammar", 'root ::= "Name: " [A-Z] [a-z]+'), 0)]
    schema, free, seeded, regex, obj, gram = run(worker, grammars, tok, jobs)
    for out in (schema, seeded):
        jsonschema.validate(json.loads(tok.decode(out)), PERSON)
        assert out[-1] in tok.eos_token_ids          # the grammar ended, and so did the sequence
    assert re.fullmatch(r"(yes|no)\.", tok.decode(regex))
    # Any JSON object: a small model may not close one within 48 tokens (that answer ends with "length").
    assert obj[-1] not in tok.eos_token_ids or isinstance(json.loads(tok.decode(obj)), dict)
    assert re.fullmatch(r"Name: [A-Z][a-z]+", tok.decode(gram)) or len(gram) == 48
    # The masks of the others never touch a free-text row: it is what it is alone.
    assert free == run(worker, grammars, tok, [(p, greedy, None, 0)])[0]
    assert grammars.compiles >= 5 and grammars.compile_seconds > 0


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=40),
                                    SamplingParams(temperature=1.0, seed=11, max_tokens=40)], ids=["greedy", "seeded"])
def test_a_resumed_request_rebuilds_its_grammar_and_goes_on_exactly(worker, grammars, tok, params):
    p, c = chat(tok, "A person, as JSON please."), Constraint("json_schema", json.dumps(PERSON))
    whole = run(worker, grammars, tok, [(p, params, c, 0)])[0]
    k = len(whole) // 2
    rest = SamplingParams(**{**params.__dict__, "max_tokens": params.max_tokens - k})
    resumed = run(worker, grammars, tok, [(p + whole[:k], rest, c, k)])[0]
    assert whole[:k] + resumed == whole
    jsonschema.validate(json.loads(tok.decode(whole)), PERSON)


def test_preempted_constrained_sequences_recompute_the_same(worker, grammars, tok):
    c = Constraint("json_schema", json.dumps(PERSON))
    jobs = [(chat(tok, f"Person number {i} as JSON."), SamplingParams(temperature=0, max_tokens=40), c, 0)
            for i in range(6)]
    roomy = run(worker, grammars, tok, jobs)
    tight = run(worker, grammars, tok, jobs, num_blocks=18)  # 6 prompts of ~40 tokens + answers: preemptions
    assert tight == roomy


def test_bad_constraints_are_refused_with_the_reason(worker, grammars, tok):
    cases = [(Constraint("json_schema", "{not json"), "not valid JSON"),
             (Constraint("json_schema", '{"type": "strin"}'), "not a valid JSON Schema"),
             (Constraint("json_schema", '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
             (Constraint("json_schema", '{"oneOf": [{"type": "integer"}]}'), "use anyOf"),
             (Constraint("regex", "(abc"), "does not compile"),
             (Constraint("grammar", "root ::= foo"), 'Rule "foo" is not defined')]
    for c, words in cases:
        with pytest.raises(GrammarError, match=re.escape(words)):
            grammars.compile(c)
    with pytest.raises(RequestError, match="response_format"):
        run(worker, grammars, tok, [([1, 2, 3], SamplingParams(max_tokens=4), Constraint("regex", "(abc"), 0)])


def test_bitmasks_pick_only_allowed_tokens_and_logprobs_stay_raw():
    vocab = 100
    logits = torch.randn(3, vocab)
    allowed = np.zeros(4, dtype=np.int32)
    allowed[2] = 1 << 3            # token 67 only
    masks = [allowed.tobytes(), None, allowed.tobytes()]
    masked = apply_bitmasks(logits, masks)
    assert torch.isinf(masked[0]).sum() == vocab - 1 and torch.equal(masked[1], logits[1])
    params = [SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, seed=3)]
    out = sample(logits, params, [0, 0, 0], masks)
    assert [out[0].token_id, out[1].token_id, out[2].token_id] == [67, int(logits[1].argmax()), 67]
    assert out[0].logprob == pytest.approx(float(logits[0].log_softmax(-1)[67]))
