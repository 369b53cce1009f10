"""Paged attention on one rank: a step may mix prefills, later chunks of a chunked prefill and
decodes, with blocks scattered anywhere in the pool, and still match the unsharded model."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from shard import attention
from shard.attention import AttentionMetadata, prefill_attention
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.sampler import SamplingParams
from shard.worker import SeqChunk, ShardWorker, StepInput
from tests.synthetic import make_llama

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_llama(tmp_path_factory.mktemp("attn") / "m", layers=3)
    worker = ShardWorker(path, ParallelContext(Layout()), num_blocks=256, block_size=BLOCK, progress=False)
    hf = LlamaForCausalLM.from_pretrained(path).eval()
    return worker, hf


def hf_next_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0, -1]


def test_mixed_step_of_prefill_chunk_and_decodes(model):
    worker, hf = model
    rng = random.Random(0)
    # Blocks handed out in a shuffled order: tables are not contiguous, as under a real block manager.
    free = list(range(256))
    rng.shuffle(free)
    prompts = {0: [rng.randrange(3, 1003) for _ in range(13)],
               1: [rng.randrange(3, 1003) for _ in range(5)],
               2: [rng.randrange(3, 1003) for _ in range(22)]}
    tables = {s: [free.pop() for _ in range(12)] for s in prompts}
    seqs = {s: list(p) for s, p in prompts.items()}

    # Step 1: seq 0 and 1 prefill whole; seq 2 prefills only its first 9 tokens (no sample yet).
    out = worker.execute(StepInput([
        SeqChunk(0, seqs[0], 0, tables[0], GREEDY, 0),
        SeqChunk(1, seqs[1], 0, tables[1], GREEDY, 0),
        SeqChunk(2, seqs[2][:9], 0, tables[2], None),
    ], return_logits=True))
    assert set(out.samples) == {0, 1}
    for row, s in enumerate((0, 1)):
        torch.testing.assert_close(out.logits[row], hf_next_logits(hf, seqs[s]), atol=1e-4, rtol=1e-4)
        seqs[s].append(out.samples[s].token_id)

    # Steps 2-6: seqs 0 and 1 decode while seq 2 prefills the rest in chunks beside them, then decodes.
    done2 = 9
    for step in range(5):
        chunks = [SeqChunk(s, [seqs[s][-1]], len(seqs[s]) - 1, tables[s], GREEDY, step + 1) for s in (0, 1)]
        if done2 < len(prompts[2]):
            n = min(7, len(prompts[2]) - done2)
            last = done2 + n == len(prompts[2])
            chunks.append(SeqChunk(2, seqs[2][done2:done2 + n], done2, tables[2], GREEDY if last else None))
            done2 += n
        else:
            chunks.append(SeqChunk(2, [seqs[2][-1]], len(seqs[2]) - 1, tables[2], GREEDY, 1))
        out = worker.execute(StepInput(chunks, return_logits=True))
        for row, s in enumerate(c.seq_id for c in chunks if c.params is not None):
            torch.testing.assert_close(out.logits[row], hf_next_logits(hf, seqs[s]), atol=1e-4, rtol=1e-4)
            seqs[s].append(out.samples[s].token_id)
    assert len(seqs[2]) > len(prompts[2]) + 1  # seq 2 finished its prefill and decoded


def test_metadata_slots_follow_block_tables():
    # seq 0: a 10-token prefill (more than MAX_DECODE_ROWS); seq 1: a decode; seq 2: a 3-token chunk
    # after 6 cached tokens (a verification), attended as three decode rows.
    meta = AttentionMetadata.build([10, 1, 3], [0, 5, 6], [[7, 2, 3], [4, 9], [5, 6, 1]], block_size=4)
    # seq 0 tokens 0..9 -> blocks 7, 2, 3; seq 1 position 5 -> block 9 offset 1; seq 2 positions 6..8 ->
    # block 6 offsets 2, 3, then block 1 offset 0.
    assert meta.slot_mapping.tolist() == [28, 29, 30, 31, 8, 9, 10, 11, 12, 13, 37, 26, 27, 4]
    assert meta.prefill_ids == [0] and meta.decode_ids.tolist() == [1, 2, 2, 2]
    assert meta.decode_token_index.tolist() == [10, 11, 12, 13]
    # Row j of a chunk after c cached tokens sees c + j + 1 keys: the causal mask, row by row.
    assert meta.decode_kv_lens.tolist() == [6, 7, 8, 9]
    assert meta.decode_mask.flatten(1).tolist() == [[True] * n + [False] * (12 - n) for n in (6, 7, 8, 9)]
    assert not meta.decode_only
    assert AttentionMetadata.build([1, 3], [5, 6], [[4, 9], [5, 6, 1]], block_size=4).decode_only


@pytest.mark.parametrize("as_rows", [True, False], ids=["decode-rows", "prefill-path"])
def test_a_verification_chunk_gives_the_models_logits_at_every_row(model, monkeypatch, as_rows):
    """A prompt, then a chunk of 5 tokens after it whose last 4 are a draft: the logits at each of the
    5 rows are the unsharded model's after that prefix, whether the chunk is attended as decode rows
    (the default, with the CPU kernels where they apply) or through the prefill path."""
    worker, hf = model
    if not as_rows:
        monkeypatch.setattr(attention, "MAX_DECODE_ROWS", 0)
    rng = random.Random(1)
    prompt, chunk = [rng.randrange(3, 1003) for _ in range(11)], [rng.randrange(3, 1003) for _ in range(5)]
    table = list(range(40, 48))
    worker.execute(StepInput([SeqChunk(0, prompt, 0, table, None)]))
    out = worker.execute(StepInput([SeqChunk(0, chunk, len(prompt), table, GREEDY, 1, num_draft=4)],
                                   return_logits=True))
    assert out.logits.shape[0] == 5
    for row in range(5):
        torch.testing.assert_close(out.logits[row], hf_next_logits(hf, prompt + chunk[:row + 1]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ctx", [0, 7])
def test_prefill_attention_is_one_4d_call_without_repeated_kv_heads(monkeypatch, ctx):
    # 3-D calls take PyTorch's math fallback on CUDA, and repeated K/V heads cost their copy: neither here.
    g = torch.Generator().manual_seed(ctx)
    q, k, v = torch.randn(5, 8, 16, generator=g), torch.randn(ctx + 5, 2, 16, generator=g), torch.randn(ctx + 5, 2, 16,
                                                                                                          generator=g)
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q4, k4, v4, **kw):
        calls.append((q4.dim(), q4.shape[1], k4.shape[1], kw["enable_gqa"]))
        return sdpa(q4, k4, v4, **kw)
    # Only shard.attention's view of it: CausalBias recognises the real function by identity.
    monkeypatch.setattr(attention, "F", SimpleNamespace(scaled_dot_product_attention=spy))
    got = prefill_attention(q, k, v, ctx, 0.25)
    assert calls == [(4, 8, 2, True)]
    mask = torch.ones(5, ctx + 5, dtype=torch.bool).tril(ctx)        # query i sees keys up to ctx + i
    expected = sdpa(q.transpose(0, 1), k.repeat_interleave(4, 1).transpose(0, 1), v.repeat_interleave(4, 1).transpose(0, 1),
                    attn_mask=mask, scale=0.25).transpose(0, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
