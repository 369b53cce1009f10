"""Every TP x PP layout generates what the unsharded Hugging Face model generates.

Each layout runs as real processes joined by gloo (LocalReplica), on a batch of prompts of
different lengths: greedy tokens must be identical for 32 new tokens and the logits of every
step must agree to float32 tolerance. The reference is a plain full-recompute greedy loop over
`transformers.LlamaForCausalLM`, with no cache, the simplest thing that can be right.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from cluster.runtime.processes import LocalReplica
from cluster.engine.executor import LocalExecutor
from cluster.engine.offline import blocks_needed, generate, Request
from cluster.api.tokenizer import Tokenizer
from shard.layout import Layout
from shard.sampler import SamplingParams
from tests.synthetic import make_llama

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def reference(model_dir, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and per-step logits [NEW_TOKENS, vocab] of each prompt, one at a time."""
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logits = [], []
    with torch.inference_mode():
        for prompt in prompts:
            ids, steps = list(prompt), []
            for _ in range(NEW_TOKENS):
                last = hf(torch.tensor([ids])).logits[0, -1]
                steps.append(last)
                ids.append(int(last.argmax()))
            tokens.append(ids[len(prompt):])
            logits.append(torch.stack(steps))
    return tokens, logits


def run_layout(model_dir, layout: Layout, prompts: list[list[int]], block_size: int):
    requests = [Request(p, GREEDY) for p in prompts]
    tokens = [[] for _ in prompts]
    logits = [[] for _ in prompts]
    with LocalReplica(model_dir, layout, num_blocks=blocks_needed(requests, block_size), block_size=block_size,
                      progress=False, timeout_s=120) as replica:
        for ev in generate(LocalExecutor(replica), requests, frozenset(), num_blocks=replica.num_blocks,
                           block_size=block_size, return_logits=True):
            tokens[ev.index].append(ev.token_id)
            logits[ev.index].append(ev.logits)
    return tokens, [torch.stack(steps) for steps in logits]


def assert_equivalent(got, want, atol: float) -> None:
    got_tokens, got_logits = got
    want_tokens, want_logits = want
    for i, (g, w) in enumerate(zip(got_tokens, want_tokens)):
        assert len(g) == NEW_TOKENS
        assert g == w, f"prompt {i}: tokens differ from step {next(k for k in range(len(g)) if g[k] != w[k])}"
    for g, w in zip(got_logits, want_logits):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-4)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    model_dir = make_llama(tmp_path_factory.mktemp("llama31") / "model", layers=6, heads=8, kv_heads=2)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1003, (n,), generator=gen).tolist() for n in (3, 9, 17, 30)]
    return model_dir, prompts, reference(model_dir, prompts)


@pytest.mark.slow
@pytest.mark.parametrize("pp", [1, 2, 3])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_synthetic_llama31_matches_transformers(synthetic, tp, pp):
    model_dir, prompts, want = synthetic
    # block_size 4: every sequence spans many blocks, so the paging is exercised.
    assert_equivalent(run_layout(model_dir, Layout(tp, pp), prompts, block_size=4), want, atol=1e-4)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    tok = Tokenizer.from_pretrained(smollm2_dir)
    questions = ["What is the capital of France?",
                 "Write a short poem about the sea and the wind, in four lines.",
                 "Hi"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    return smollm2_dir, prompts, reference(smollm2_dir, prompts)


@pytest.mark.slow
@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_matches_transformers(smollm2, tp, pp):
    model_dir, prompts, want = smollm2
    assert_equivalent(run_layout(model_dir, Layout(tp, pp), prompts, block_size=16), want, atol=1e-3)
