"""Planning Llama 3.1 405B over TP 8 x PP 2 from its config and index alone (meta device, no weights)."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict

import pytest
import torch

from shard.config import ModelConfig
from shard.layout import Layout, LayoutError
from shard.loader import Checkpoint
from shard.model import LlamaStage, checkpoint_shapes
from shard.parallel import ParallelContext
from shard.plan import RankPlan, format_plan, plan_replica
from tests.conftest import SHARED

FIXTURE = SHARED / "fixtures" / "llama-3.1-405b-instruct"
TOTAL_PARAMS = 405_853_388_800
LAYOUT = Layout(8, 2)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, ...]]:
    raw = json.loads((FIXTURE / "shapes.json").read_text())
    return {name: tuple(entry["shape"]) for name, entry in raw.items()}


@pytest.fixture(scope="module")
def weight_map() -> dict[str, str]:
    return json.loads((FIXTURE / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.fixture(scope="module")
def plans(cfg: ModelConfig) -> list[RankPlan]:
    return plan_replica(cfg, LAYOUT, Checkpoint.open(FIXTURE), torch.bfloat16)


def test_fixture_is_consistent(cfg: ModelConfig, shapes, weight_map) -> None:
    assert sum(math.prod(s) for s in shapes.values()) == TOTAL_PARAMS
    assert shapes.keys() == weight_map.keys()
    assert checkpoint_shapes(cfg) == shapes  # what the model expects is what the checkpoint holds
    assert len(set(weight_map.values())) == 191


def test_parameter_count(plans: list[RankPlan], shapes) -> None:
    assert [p.rank for p in plans] == list(range(16))
    assert sum(p.owned_params for p in plans) == TOTAL_PARAMS == sum(math.prod(s) for s in shapes.values())


def test_per_rank_memory(plans: list[RankPlan], cfg: ModelConfig) -> None:
    h, tp = cfg.hidden_size, LAYOUT.tp
    per_layer = ((cfg.q_size + 2 * cfg.kv_size) // tp * h + h * cfg.q_size // tp
                 + 3 * cfg.intermediate_size // tp * h + 2 * h)
    vocab_rows = -(-cfg.vocab_size // tp)
    for p in plans:
        assert (p.pp_rank, p.tp_rank) == LAYOUT.coords(p.rank)
        assert p.layers == (range(0, 63) if p.pp_rank == 0 else range(63, 126))
        extra = vocab_rows * h if p.pp_rank == 0 else vocab_rows * h + h  # embedding; LM head + final norm
        assert p.params == 63 * per_layer + extra
        assert p.weight_bytes == 2 * p.params
        assert 50.6e9 < p.weight_bytes < 50.8e9, p  # "50.7 GB per GPU"
        # One KV head per rank, 63 layers, K and V, bf16.
        assert p.kv_bytes_per_token == 2 * 63 * 1 * 128 * 2
    # Held parameters exceed the model only by the replicated norms.
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    assert sum(p.params for p in plans) == TOTAL_PARAMS + (tp - 1) * norms


def layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def test_files_per_stage(plans: list[RankPlan], weight_map) -> None:
    stage0 = {f for n, f in weight_map.items()
              if n == "model.embed_tokens.weight" or (layer_of(n) is not None and layer_of(n) <= 62)}
    stage1 = {f for n, f in weight_map.items()
              if n in ("model.norm.weight", "lm_head.weight") or (layer_of(n) is not None and layer_of(n) >= 63)}
    every = set(weight_map.values())
    assert stage0 | stage1 == every and stage0 < every and stage1 < every
    for p in plans:
        assert list(p.files) == sorted(stage0 if p.pp_rank == 0 else stage1), p.rank
    # Each stage opens about half of the 191 files (one may hold the boundary between the stages).
    assert len(stage0) + len(stage1) - len(stage0 & stage1) == 191
    assert len(stage0 & stage1) <= 1


def test_meta_slices_match_shapes_json(cfg: ModelConfig, shapes) -> None:
    covered: dict[tuple[str, int], set[tuple[int, int]]] = defaultdict(set)
    for rank in range(LAYOUT.world_size):
        model = LlamaStage(cfg, ParallelContext(LAYOUT, rank), torch.bfloat16, device="meta")
        params = dict(model.named_parameters())
        for pname, group in model.checkpoint_slices().items():
            assert pname in params
            for s in group:
                assert s.shape == shapes[s.name], (rank, s)
                assert 0 <= s.start and s.start + s.length <= s.shape[s.dim]
                # The slice fits where it goes in the parameter.
                assert s.dst_offset + s.length <= params[pname].shape[s.dim]
                other = [d for d in range(len(s.shape)) if d != s.dim]
                assert [params[pname].shape[d] for d in other] == [s.shape[d] for d in other]
                covered[(s.name, s.dim)].add((s.start, s.length))
    assert {name for name, _ in covered} == shapes.keys()
    # Over all ranks, every tensor is covered exactly: its slices tile [0, size) along the split dim.
    for (name, dim), parts in covered.items():
        position = 0
        for start, length in sorted(parts):
            assert start == position, name
            position += length
        assert position == shapes[name][dim], name


def test_meta_model_shapes_rank0_and_last(cfg: ModelConfig) -> None:
    first = LlamaStage(cfg, ParallelContext(LAYOUT, 0), torch.bfloat16, device="meta")
    p = {n: tuple(t.shape) for n, t in first.named_parameters()}
    assert all(t.is_meta for t in first.parameters())
    assert p["layers.0.self_attn.qkv_proj.weight"] == ((128 + 8 + 8) * 128 // 8, 16384) == (2304, 16384)
    assert p["layers.0.self_attn.o_proj.weight"] == (16384, 2048)
    assert p["layers.62.mlp.gate_up_proj.weight"] == (2 * 53248 // 8, 16384)
    assert p["layers.62.mlp.down_proj.weight"] == (16384, 53248 // 8)
    assert p["embed_tokens.weight"] == (128256 // 8, 16384)
    assert "layers.63.input_layernorm.weight" not in p and "lm_head.weight" not in p
    assert len(first.layers) == 63

    last = LlamaStage(cfg, ParallelContext(LAYOUT, 15), torch.bfloat16, device="meta")
    p = {n: tuple(t.shape) for n, t in last.named_parameters()}
    assert p["lm_head.weight"] == (16032, 16384) and p["norm.weight"] == (16384,)
    assert "embed_tokens.weight" not in p
    assert last.layer_range == range(63, 126)
    assert last.checkpoint_slices()["layers.0.self_attn.qkv_proj.weight"][0].name == \
        "model.layers.63.self_attn.q_proj.weight"


def test_kv_replication_counted_once(cfg: ModelConfig) -> None:
    # TP 16 over 8 KV heads: each KV head lives on two ranks, but is one checkpoint slice.
    plans = plan_replica(cfg, Layout(16, 1), None, torch.bfloat16)
    assert sum(p.owned_params for p in plans) == TOTAL_PARAMS
    assert all(p.files == () for p in plans)
    kv_rows = 2 * cfg.head_dim * cfg.hidden_size * cfg.num_layers  # one K and one V head on every layer
    assert sum(p.params for p in plans) - TOTAL_PARAMS == \
        15 * (2 * cfg.num_layers + 1) * cfg.hidden_size + 16 * kv_rows - 2 * cfg.kv_size * cfg.hidden_size * 126


def test_single_rank_plan(cfg: ModelConfig) -> None:
    (plan,) = plan_replica(cfg, Layout(), Checkpoint.open(FIXTURE), torch.bfloat16)
    assert plan.params == plan.owned_params == TOTAL_PARAMS
    assert plan.weight_bytes == 811_706_777_600  # the index's total_size
    assert len(plan.files) == 191
    assert plan.kv_bytes_per_token == cfg.kv_bytes_per_token(2)


def test_bad_layout_refused(cfg: ModelConfig) -> None:
    with pytest.raises(LayoutError, match="use TP 1, 2, 4, 8, 16, 32, 64 or 128"):
        plan_replica(cfg, Layout(3, 1))
    with pytest.raises(LayoutError, match="126 layers"):
        plan_replica(cfg, Layout(8, 127))


def test_format_plan(cfg: ModelConfig, plans: list[RankPlan]) -> None:
    text = format_plan(cfg, LAYOUT, plans, torch.bfloat16)
    assert "TP 8 x PP 2 = 16 GPUs, bfloat16" in text
    assert "model parameters 405,853,388,800" in text
    assert "largest rank 50.74 GB" in text
    rows = [line.split() for line in text.splitlines()[2:-1]]
    assert len(rows) == 16
    assert rows[0][:4] == ["0", "0", "0", "0-62"] and rows[15][:4] == ["15", "1", "7", "63-125"]
    assert all(r[5] == "50.74" and r[6] == "32.3" for r in rows)


def test_fp8_plan(cfg: ModelConfig) -> None:
    from shard.plan import as_fp8

    fp8 = as_fp8(cfg)
    assert as_fp8(fp8) is fp8
    plans = plan_replica(fp8, LAYOUT, None, torch.bfloat16)
    assert sum(p.owned_params for p in plans) == TOTAL_PARAMS
    # The MLPs of layers 1..124 are FP8: 1 byte each, and a float32 scale for each row a rank holds.
    assert sum(p.fp8_params for p in plans) == 124 * 3 * cfg.hidden_size * cfg.intermediate_size
    stage0 = plans[0]
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size // 8
    scales = 2 * cfg.intermediate_size // 8 + cfg.hidden_size
    assert stage0.weight_bytes == 2 * stage0.params - 62 * (mlp - 4 * scales)  # layers 1..62 of stage 0
    assert "TP 8 x PP 2 = 16 GPUs, fp8 + bfloat16" in format_plan(fp8, LAYOUT, plans, torch.bfloat16)
