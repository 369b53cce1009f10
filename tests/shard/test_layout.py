"""Layout: which TP x PP layouts can hold a model, and how stages split the layers."""

from __future__ import annotations

import itertools

import pytest

from shard.config import ModelConfig
from shard.layout import Layout, LayoutError, check_layout, model_stage_layers, stage_layers, valid_tp
from tests.conftest import SHARED


def config(*, heads: int = 8, kv_heads: int = 2, layers: int = 6, intermediate: int = 256,
           name: str = "m") -> ModelConfig:
    return ModelConfig(vocab_size=1003, hidden_size=heads * 16, intermediate_size=intermediate, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4,
                       rope_scaling=None, max_position_embeddings=4096, tie_word_embeddings=False, name=name)


def layout_error(cfg: ModelConfig, layout: Layout) -> str:
    with pytest.raises(LayoutError) as e:
        check_layout(cfg, layout)
    return str(e.value)


def test_valid_layouts_pass() -> None:
    cfg = config(heads=8, kv_heads=2, layers=6)
    for tp, pp in itertools.product((1, 2, 4, 8), (1, 2, 3, 6)):
        check_layout(cfg, Layout(tp, pp))
    assert valid_tp(cfg) == [1, 2, 4, 8]


def test_tp_not_dividing_heads_lists_choices() -> None:
    # SmolLM2's attention shape, with an intermediate size that 9 divides.
    cfg = config(heads=9, kv_heads=3, layers=30, intermediate=1152, name="smol")
    msg = layout_error(cfg, Layout(2, 1))
    assert "TP=2" in msg and "9 attention heads" in msg and "smol" in msg
    assert "use TP 1, 3 or 9" in msg
    check_layout(cfg, Layout(3, 1))
    check_layout(cfg, Layout(9, 1))  # 3 KV heads, each replicated on 3 ranks


def test_real_smollm2_intermediate_rules_out_tp9() -> None:
    # SmolLM2-135M's intermediate_size is 1536, which 9 does not divide: only TP 1 or 3 shard it.
    cfg = config(heads=9, kv_heads=3, layers=30, intermediate=1536)
    msg = layout_error(cfg, Layout(2, 1))
    assert msg.endswith("use TP 1 or 3")
    msg = layout_error(cfg, Layout(9, 1))
    assert "intermediate_size=1536" in msg and "use TP 1 or 3" in msg


def test_tp_above_kv_heads() -> None:
    cfg = config(heads=8, kv_heads=2)
    check_layout(cfg, Layout(4, 1))  # KV heads replicated twice
    check_layout(cfg, Layout(8, 1))  # four times
    # 12 heads, 4 KV heads: TP 6 divides the heads and is above the KV heads, but not a multiple of them.
    cfg = config(heads=12, kv_heads=4, intermediate=240)
    msg = layout_error(cfg, Layout(6, 1))
    assert "TP=6" in msg and "4 KV heads" in msg and "not a multiple" in msg
    assert "use TP 1, 2, 4 or 12" in msg


def test_tp_not_dividing_kv_heads() -> None:
    cfg = config(heads=12, kv_heads=6, intermediate=240)
    msg = layout_error(cfg, Layout(4, 1))
    assert "TP=4" in msg and "6 KV heads" in msg


def test_pp_above_layers() -> None:
    cfg = config(layers=6)
    check_layout(cfg, Layout(1, 6))
    msg = layout_error(cfg, Layout(1, 7))
    assert "PP=7" in msg and "6 layers" in msg and "between 1 and 6" in msg


@pytest.mark.parametrize("tp,pp", [(0, 1), (1, 0), (-2, 1)])
def test_non_positive_degrees(tp: int, pp: int) -> None:
    assert "at least 1" in layout_error(config(), Layout(tp, pp))


def test_stage_layers_uneven() -> None:
    stages = [stage_layers(30, 4, r) for r in range(4)]
    assert [len(s) for s in stages] == [8, 8, 7, 7]
    assert [(s.start, s.stop) for s in stages] == [(0, 8), (8, 16), (16, 23), (23, 30)]


@pytest.mark.parametrize("layers", [1, 2, 7, 30, 126])
def test_stage_layers_contiguous_and_covering(layers: int) -> None:
    for pp in range(1, layers + 1):
        stages = [stage_layers(layers, pp, r) for r in range(pp)]
        assert [i for s in stages for i in s] == list(range(layers))
        sizes = [len(s) for s in stages]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the extra layers go to the first stages


def test_405b_stages() -> None:
    assert stage_layers(126, 2, 0) == range(0, 63)
    assert stage_layers(126, 2, 1) == range(63, 126)


def test_rank_coords_round_trip() -> None:
    for tp, pp in itertools.product((1, 2, 3, 8), (1, 2, 5)):
        layout = Layout(tp, pp)
        assert layout.world_size == tp * pp
        seen = []
        for rank in range(layout.world_size):
            pp_rank, tp_rank = layout.coords(rank)
            assert 0 <= pp_rank < pp and 0 <= tp_rank < tp
            assert layout.rank(pp_rank, tp_rank) == rank
            seen.append((pp_rank, tp_rank))
        assert seen == sorted(seen)  # one stage's TP ranks are consecutive
    assert Layout(8, 2).coords(9) == (1, 1)
    assert str(Layout(8, 2)) == "TP 8 x PP 2"


def test_stage_layers_give_the_last_stage_fewer_layers_for_the_lm_head() -> None:
    assert [stage_layers(30, 2, r, head_layers=8) for r in range(2)] == [range(0, 19), range(19, 30)]
    # Never an empty last stage, however heavy the head.
    for layers, pp in [(6, 3), (2, 2), (4, 4)]:
        stages = [stage_layers(layers, pp, r, head_layers=50) for r in range(pp)]
        assert all(len(s) >= 1 for s in stages) and stages[-1].stop == layers and stages[0].start == 0
        assert all(a.stop == b.start for a, b in zip(stages, stages[1:]))


def test_model_split_counts_the_head_in_layers_by_decode_time(smollm2_dir) -> None:
    # SmolLM2-135M: the 49152 x 576 head streams the weight of 8 layers, but a layer costs a quarter
    # more than its weights, so it counts as 6: 18 + 12 layers on PP 2 (bench/pp_ceiling.py shows
    # the two stages within a few percent of each other).
    smollm2 = ModelConfig.from_pretrained(smollm2_dir)
    assert [model_stage_layers(smollm2, 2, r) for r in range(2)] == [range(0, 18), range(18, 30)]
    assert [len(model_stage_layers(smollm2, 3, r)) for r in range(3)] == [12, 12, 6]
    # Llama 3.1 405B: its head is under one layer, so the 126 layers split evenly.
    llama405b = ModelConfig.from_pretrained(SHARED / "fixtures" / "llama-3.1-405b-instruct")
    assert [model_stage_layers(llama405b, 2, r) for r in range(2)] == [range(0, 63), range(63, 126)]
