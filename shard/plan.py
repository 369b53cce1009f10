"""What each rank of a TP x PP layout holds and reads, computed on the meta device: no weights,
no memory, so a 405B plan runs on a laptop from its config.json and index alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from shard.config import ModelConfig, QuantizationConfig
from shard.layout import Layout, check_layout
from shard.loader import Checkpoint
from shard.model import LlamaStage, rank_kv_bytes_per_token
from shard.parallel import ParallelContext
from shard.quant import meta_fp8_recipe, resident_weight_names, slice_bytes


@dataclass(frozen=True)
class RankPlan:
    rank: int
    pp_rank: int
    tp_rank: int
    layers: range
    params: int                    # what the rank holds, replicated tensors (norms) included
    owned_params: int              # its share of the checkpoint: a replicated slice counts on one rank only
    weight_bytes: int
    kv_bytes_per_token: int        # this rank's share of one token's K and V, its layers only
    files: tuple[str, ...]         # checkpoint files this rank opens
    fp8_params: int = 0            # of `params`, those kept FP8 (`shard.quant.resident_weight_names`)


def as_fp8(cfg: ModelConfig) -> ModelConfig:
    """`cfg` as an FP8 checkpoint of it: its own `quantization_config`, or else Meta's Llama 3.1 FP8
    recipe (`shard.quant.meta_fp8_recipe`)."""
    if cfg.quantization is not None:
        return cfg
    return dataclasses.replace(cfg, quantization=QuantizationConfig(meta_fp8_recipe(cfg)))


def plan_replica(cfg: ModelConfig, layout: Layout, checkpoint: Checkpoint | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> list[RankPlan]:
    """Every rank of one replica. The FP8 tensors of `cfg.quantization` that a GPU keeps FP8
    (`shard.quant.resident_weight_names`) count 1 byte an element plus their float32 row scales; the
    rest, and the KV cache, `dtype`."""
    check_layout(cfg, layout)
    itemsize = torch.empty((), dtype=dtype).element_size()
    fp8 = resident_weight_names(cfg)
    plans, seen = [], set()
    for rank in range(layout.world_size):
        model = LlamaStage(cfg, ParallelContext(layout, rank), dtype, device="meta")
        slices = model.checkpoint_slices()
        params = sum(p.numel() for p in model.parameters())
        weight_bytes = fp8_params = 0
        for name, p in model.named_parameters():
            read = sum(s.numel for s in slices[name])   # less than numel() where the vocabulary is padded
            weight_bytes += sum(slice_bytes(s, fp8, dtype) for s in slices[name]) + (p.numel() - read) * itemsize
            fp8_params += sum(s.numel for s in slices[name] if s.name in fp8)
        # The first rank to read a slice owns it; summed over ranks, owned counts equal the model.
        owned = 0
        for s in (s for group in slices.values() for s in group):
            key = (s.name, s.dim, s.start, s.length)
            if key not in seen:
                seen.add(key)
                owned += s.numel
        kv = rank_kv_bytes_per_token(cfg, layout.tp, len(model.layers), itemsize)
        files = tuple(checkpoint.files_for(slices)) if checkpoint else ()
        pp_rank, tp_rank = layout.coords(rank)
        plans.append(RankPlan(rank, pp_rank, tp_rank, model.layer_range, params, owned, weight_bytes, kv, files,
                              fp8_params))
    return plans


def format_plan(cfg: ModelConfig, layout: Layout, plans: list[RankPlan], dtype: torch.dtype) -> str:
    dtype_name = ("fp8 + " if cfg.quantization else "") + str(dtype).removeprefix("torch.")
    lines = [f"{cfg.name}: {cfg.num_layers} layers, {cfg.num_heads} heads, {cfg.num_kv_heads} KV heads, "
             f"vocab {cfg.vocab_size}; {layout} = {layout.world_size} GPUs, {dtype_name}",
             f"{'rank':>4} {'stage':>5} {'tp':>3} {'layers':>9} {'params':>16} {'weights GB':>10} "
             f"{'KV KB/token':>11} {'files':>5}"]
    for p in plans:
        lines.append(f"{p.rank:>4} {p.pp_rank:>5} {p.tp_rank:>3} {f'{p.layers.start}-{p.layers.stop - 1}':>9} "
                     f"{p.params:>16,} {p.weight_bytes / 1e9:>10.2f} {p.kv_bytes_per_token / 1e3:>11.1f} "
                     f"{len(p.files):>5}")
    lines.append(f"model parameters {sum(p.owned_params for p in plans):,} (replicated norms counted once); largest rank "
                 f"{max(p.weight_bytes for p in plans) / 1e9:.2f} GB of weights")
    return "\n".join(lines)
