"""How many KV blocks every shard of a replica allocates, from `kv_cache` in the cluster config."""

from __future__ import annotations

from cluster.config import ServeConfig
from shard.config import ModelConfig
from shard.errors import UserError
from shard.graphs import graph_memory_bound
from shard.layout import model_stage_layers
from shard.model import rank_kv_bytes_per_token
from shard.worker import GRAPH_MAX_CONTEXT


class KVBudgetError(UserError, RuntimeError):
    """`kv_cache.memory_per_shard` holds no block; the message says what to raise or lower."""


def kv_blocks(cfg: ServeConfig, model: ModelConfig, gpu: bool = False, draft: ModelConfig | None = None) -> int:
    """KV blocks every shard allocates: what fits in `memory_per_shard` on the rank holding the
    most layers (block ids are shared by all stages, so every rank allocates the same count). On
    GPUs with `shard.cuda_graphs`, the graphs' memory comes out of that budget first
    (`shard.graphs.graph_memory_bound`). With a `draft` model (speculative.method: draft), rank 0
    holds the draft's KV for the same blocks too, and a block counts both."""
    kv = cfg.kv_cache
    if kv.num_blocks is not None:
        return kv.num_blocks
    layout = cfg.shard_layout
    layers = max(len(model_stage_layers(model, layout.pp, s)) for s in range(layout.pp))
    per_block = kv.block_size * rank_kv_bytes_per_token(model, layout.tp, layers, cfg.model.torch_dtype.itemsize)
    if draft is not None:
        per_block += kv.block_size * rank_kv_bytes_per_token(draft, 1, draft.num_layers,
                                                             cfg.model.torch_dtype.itemsize)
    graphs = graph_reserve(cfg, model, gpu)
    blocks = (kv.memory_per_shard - graphs) // per_block
    if blocks < 1:
        reserve = f", less {graphs} bytes for the CUDA graphs (shard.cuda_graphs)," if graphs else ""
        raise KVBudgetError(f"kv_cache.memory_per_shard ({kv.memory_per_shard} bytes){reserve} holds no block of "
                            f"{per_block} bytes; raise it or lower kv_cache.block_size")
    return blocks


def graph_reserve(cfg: ServeConfig, model: ModelConfig, gpu: bool) -> int:
    """Bytes of `kv_cache.memory_per_shard` the decode graphs may take on each GPU shard."""
    if not (gpu and cfg.shard.cuda_graphs and cfg.shard.device != "cpu"):
        return 0
    context = min(GRAPH_MAX_CONTEXT, model.max_position_embeddings)
    return graph_memory_bound(model, cfg.layout.tp, cfg.scheduler.max_num_seqs, context, cfg.model.torch_dtype)
