"""Each values set's layout agrees with `caravan plan` for its model: the layout shards the model, and
the largest shard's weights plus its KV cache fit the device that holds it, with room to spare."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from cluster.config import ServeConfig
from shard.config import ModelConfig
from shard.layout import Layout
from shard.plan import RankPlan, as_fp8, plan_replica
from tests.conftest import SHARED
from tests.helm.chart import EXAMPLES, VALUE_SETS, Helm, app_args, values

LLAMA_405B = SHARED / "fixtures" / "llama-3.1-405b-instruct"
DEMO = "demo"  # model.path null: the embedded SmolLM2-135M-Instruct
# The model each values set serves; a new example needs its line here.
MODELS: dict[str | None, Path | str] = {
    None: DEMO,
    "llama-3.1-405b-bf16-2x8xh100.yaml": LLAMA_405B,
    "llama-3.1-405b-fp8-1x8xh100.yaml": LLAMA_405B,
    "smollm2-cpu.yaml": DEMO,
}
# Values sets whose checkpoint is Meta's FP8 one: planned from the BF16 fixture with Meta's FP8 recipe.
FP8 = {"llama-3.1-405b-fp8-1x8xh100.yaml"}
# Of a GPU: the CUDA context, activations and NCCL's buffers take the rest. Of a CPU worker's memory
# per shard: a Python process with torch and Ray takes hundreds of MB besides its tensors.
GPU_HEADROOM, CPU_HEADROOM = 0.9, 0.5
_QUANTITY = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def size(text: str) -> int:
    """A Caravan size (80GiB), read by Caravan's own config loader."""
    return ServeConfig.from_dict({"kv_cache": {"memory_per_shard": text}}).kv_cache.memory_per_shard


def quantity(text: str) -> int:
    """A Kubernetes memory quantity (1000Gi, 6G)."""
    match = re.fullmatch(r"([0-9.]+)([kMGT]i?|Ki)?", str(text))
    assert match, f"not a memory quantity: {text}"
    return int(float(match[1]) * _QUANTITY[match[2] or ""])


@lru_cache
def plan(folder: Path, tp: int, pp: int, dtype: torch.dtype, fp8: bool = False) -> list[RankPlan]:
    cfg = ModelConfig.from_pretrained(folder)
    return plan_replica(as_fp8(cfg) if fp8 else cfg, Layout(tp, pp), dtype=dtype)


def test_every_example_has_a_model() -> None:
    assert set(MODELS) == set(VALUE_SETS) and set(EXAMPLES) <= set(MODELS)


@pytest.mark.parametrize("example", VALUE_SETS)
def test_layout_fits_the_device(helm: Helm, example: str | None, request: pytest.FixtureRequest) -> None:
    config = ServeConfig.from_dict(app_args(helm.render(example)))
    v = values(example)
    model = MODELS[example]
    assert (config.model.path is None) == (model == DEMO)
    folder = request.getfixturevalue("smollm2_dir") if model == DEMO else model
    plans = plan(Path(folder), config.layout.tp, config.layout.pp, config.model.torch_dtype, example in FP8)

    kv = config.kv_cache.memory_per_shard
    needed = max(p.weight_bytes for p in plans) + kv
    workers = v["workers"]
    if workers["gpusPerNode"]:
        device, headroom = size(workers["gpuMemory"]), GPU_HEADROOM
    else:
        memory = quantity(workers["resources"]["limits"]["memory"])
        device, headroom = memory // workers["cpuShardsPerNode"], CPU_HEADROOM
    assert needed <= headroom * device, (
        f"largest shard {needed / 2**30:.1f} GiB (weights + kv_cache.memory_per_shard) does not fit "
        f"{headroom:.0%} of {device / 2**30:.1f} GiB")
    # The KV cache holds at least one step's tokens on the shard with the most KV per token.
    assert kv // max(p.kv_bytes_per_token for p in plans) >= config.scheduler.max_tokens_per_step


def test_405b_bf16_numbers(helm: Helm) -> None:
    """The example's own comment: at most 47.3 GiB of weights per shard, plus 20 GiB of KV, on 80 GiB."""
    config = ServeConfig.from_dict(app_args(helm.render("llama-3.1-405b-bf16-2x8xh100.yaml")))
    plans = plan(LLAMA_405B, 8, 2, torch.bfloat16)
    assert (config.layout.tp, config.layout.pp, config.model.dtype) == (8, 2, "bfloat16")
    assert round(max(p.weight_bytes for p in plans) / 2**30, 1) == 47.3
    assert config.kv_cache.memory_per_shard == 20 * 2**30
