"""Sampling: parameter validation, greedy and seeded sampling, filters, logprobs, stop reasons."""

from __future__ import annotations

import math

import pytest
import torch

from shard.sampler import SamplingError, SamplingParams, sample, stop_reason


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf),
    ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1),
    ("max_tokens", 0), ("logprobs", 21), ("logprobs", -1), ("seed", -1), ("seed", 2**63),
])
def test_invalid_params_name_the_field(field: str, value) -> None:
    with pytest.raises(SamplingError, match=rf"^{field} ") as e:
        SamplingParams(**{field: value})
    assert str(value) in str(e.value) or (value == 2**63 and "2^63" in str(e.value))


def test_valid_edges() -> None:
    SamplingParams(temperature=0, top_k=0, top_p=1.0, max_tokens=1, logprobs=0, seed=0)
    SamplingParams(logprobs=20, seed=2**63 - 1, top_p=1e-9)
    p = SamplingParams(stop_token_ids=[5, 7])
    assert p.stop_token_ids == frozenset({5, 7})
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def logits(rows: int = 6, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def ids(samples) -> list[int]:
    return [s.token_id for s in samples]


def test_greedy_is_argmax() -> None:
    x = logits()
    out = sample(x, [SamplingParams(temperature=0)] * len(x), [0] * len(x))
    assert ids(out) == x.argmax(dim=-1).tolist()
    assert all(s.logprob is None and s.top_logprobs is None for s in out)


def test_greedy_in_half_precision() -> None:
    x = logits().to(torch.bfloat16)
    out = sample(x, [SamplingParams(temperature=0)] * len(x), [0] * len(x))
    assert ids(out) == x.float().argmax(dim=-1).tolist()


def test_mixed_batch() -> None:
    x = logits(rows=5)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.7, top_k=1, seed=3),
              SamplingParams(temperature=2.0, seed=11, top_p=0.9)]
    out = ids(sample(x, params, [0, 1, 2, 3, 4]))
    argmax = x.argmax(dim=-1).tolist()
    assert out[0] == argmax[0] and out[1] == argmax[1] and out[3] == argmax[3]
    # A seeded row samples the same token alone as in the batch.
    for i in (2, 4):
        assert ids(sample(x[i:i + 1], [params[i]], [i])) == [out[i]]
    # Reproducible batch.
    assert ids(sample(x, params, [0, 1, 2, 3, 4])) == out


def test_seeded_reproducible_and_varies_with_index() -> None:
    x = torch.zeros(1, 1000)  # uniform: any two independent draws rarely agree
    p = SamplingParams(temperature=1.0, seed=1234)
    first = [ids(sample(x, [p], [i]))[0] for i in range(20)]
    again = [ids(sample(x, [p], [i]))[0] for i in range(20)]
    assert first == again
    assert len(set(first)) >= 15  # differs across output_index
    other_seed = [ids(sample(x, [SamplingParams(temperature=1.0, seed=1235)], [i]))[0] for i in range(20)]
    assert other_seed != first
    # The global RNG does not affect seeded rows.
    torch.manual_seed(0)
    a = ids(sample(x, [p], [5]))
    torch.manual_seed(1)
    assert ids(sample(x, [p], [5])) == a == [first[5]]


def test_top_k_never_outside() -> None:
    x = logits(rows=1, vocab=40, seed=3)
    top5 = set(x[0].topk(5).indices.tolist())
    params = SamplingParams(temperature=1.5, top_k=5, seed=99)
    drawn = [ids(sample(x, [params], [i]))[0] for i in range(600)]
    assert set(drawn) <= top5
    assert len(set(drawn)) == 5  # and uses all of them at this temperature


def test_top_k_above_vocab_keeps_all() -> None:
    x = torch.zeros(1, 4)
    drawn = {ids(sample(x, [SamplingParams(top_k=10, seed=1)], [i]))[0] for i in range(200)}
    assert drawn == {0, 1, 2, 3}


def test_top_p_small_picks_top_token() -> None:
    x = logits(rows=3, seed=4)
    params = [SamplingParams(temperature=1.0, top_p=0.01, seed=s) for s in range(3)]
    for i in range(50):
        assert ids(sample(x, params, [i] * 3)) == x.argmax(dim=-1).tolist()


def test_top_p_keeps_nucleus() -> None:
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.8).
    x = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    drawn = [ids(sample(x, [SamplingParams(top_p=0.7, seed=5)], [i]))[0] for i in range(1000)]
    assert set(drawn) == {0, 1}
    assert abs(drawn.count(0) / 1000 - 0.5 / 0.8) < 0.05


def test_temperature_one_matches_softmax() -> None:
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    expected = x.softmax(dim=-1)[0]
    n = 4000
    drawn = torch.tensor([ids(sample(x, [SamplingParams(temperature=1.0, seed=42)], [i]))[0] for i in range(n)])
    freq = torch.bincount(drawn, minlength=4).float() / n
    assert (freq - expected).abs().max() < 0.03, (freq, expected)
    chi2 = float(((freq - expected) ** 2 / expected).sum() * n)
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001


def test_temperature_sharpens() -> None:
    x = torch.tensor([[1.0, 0.0]])
    hot = [ids(sample(x, [SamplingParams(temperature=2.0, seed=1)], [i]))[0] for i in range(2000)]
    cold = [ids(sample(x, [SamplingParams(temperature=0.25, seed=1)], [i]))[0] for i in range(2000)]
    p_hot, p_cold = torch.tensor([0.5, 0.0]).softmax(0)[1], torch.tensor([4.0, 0.0]).softmax(0)[1]
    assert abs(sum(hot) / 2000 - float(p_hot)) < 0.04
    assert abs(sum(cold) / 2000 - float(p_cold)) < 0.02


def test_unseeded_rows_sample() -> None:
    x = torch.zeros(1, 100)
    torch.manual_seed(0)
    drawn = {ids(sample(x, [SamplingParams(temperature=1.0)], [0]))[0] for _ in range(50)}
    assert len(drawn) > 20


def test_logprobs() -> None:
    x = logits(rows=3, vocab=30, seed=5)
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=0.8, seed=1, logprobs=0),
              SamplingParams(temperature=0)]
    out = sample(x, params, [0, 0, 0])
    ref = x.log_softmax(dim=-1)
    for i in (0, 1):
        assert out[i].logprob == pytest.approx(float(ref[i, out[i].token_id]), abs=1e-6)
    assert out[2].logprob is None and out[2].top_logprobs is None
    assert out[1].top_logprobs is None  # logprobs=0: the chosen token only
    top = out[0].top_logprobs
    assert len(top) == 5
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    assert [t for t, _ in top] == ref[0].topk(5).indices.tolist()
    assert top[0][0] == out[0].token_id and top[0][1] == pytest.approx(out[0].logprob)


def test_logprob_is_of_raw_logits_not_tempered() -> None:
    x = torch.tensor([[3.0, 0.0, -3.0]])
    (s,) = sample(x, [SamplingParams(temperature=0.1, top_k=1, seed=0, logprobs=2)], [0])
    assert s.token_id == 0
    assert s.logprob == pytest.approx(float(x.log_softmax(-1)[0, 0]), abs=1e-6)
    assert [t for t, _ in s.top_logprobs] == [0, 1]


def test_stop_reason() -> None:
    eos = frozenset({2, 3})
    p = SamplingParams(max_tokens=4, stop_token_ids=[9])
    assert stop_reason(p, 5, 1, eos) is None
    assert stop_reason(p, 9, 1, eos) == "stop"
    assert stop_reason(p, 2, 1, eos) == "stop" and stop_reason(p, 3, 2, eos) == "stop"
    assert stop_reason(p, 5, 4, eos) == "length"
    assert stop_reason(p, 2, 4, eos) == "stop"  # a stop on the last allowed token is a stop
    ignore = SamplingParams(max_tokens=4, ignore_eos=True, stop_token_ids=[9])
    assert stop_reason(ignore, 2, 1, eos) is None
    assert stop_reason(ignore, 9, 1, eos) == "stop"  # explicit stop tokens still stop
    assert stop_reason(ignore, 2, 4, eos) == "length"


def test_tiny_temperature_is_near_greedy() -> None:
    x = torch.tensor([[1.0, 5.0, 2.0, -3.0]])
    (s,) = sample(x, [SamplingParams(temperature=1e-38, seed=1)], [0])
    assert s.token_id == 1
