"""How many KV blocks a shard allocates from `kv_cache.memory_per_shard`: on GPUs with CUDA graphs,
the graphs' memory comes out of the budget first."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cluster.config import ServeConfig
from cluster.runtime.kv_budget import KVBudgetError, graph_reserve, kv_blocks
from shard.config import ModelConfig
from shard.graphs import graph_memory_bound
from tests.conftest import SHARED

LLAMA_405B = ModelConfig.from_pretrained(SHARED / "fixtures" / "llama-3.1-405b-instruct")


def config(**shard) -> ServeConfig:
    return ServeConfig.from_dict({"model": {"dtype": "bfloat16"}, "layout": {"tp": 8, "pp": 2},
                                  "kv_cache": {"memory_per_shard": "20GiB", "block_size": 16},
                                  "scheduler": {"max_num_seqs": 256, "max_tokens_per_step": 2048},
                                  "shard": {"device": "cuda", **shard}})


def test_cuda_graphs_take_their_bound_out_of_the_kv_budget_on_gpus_only():
    # One KV block of a 405B TP 8 x PP 2 shard: 63 layers x 16 tokens x 1 KV head x 128 dims x 2 (K, V) x 2 bytes.
    per_block = 63 * 16 * 128 * 2 * 2
    without = kv_blocks(config(cuda_graphs=False), LLAMA_405B, gpu=True)
    assert without == 20 * 2**30 // per_block
    assert kv_blocks(config(), LLAMA_405B, gpu=False) == without  # CPU shards: no graphs
    reserve = graph_reserve(config(), LLAMA_405B, gpu=True)
    assert reserve == graph_memory_bound(LLAMA_405B, 8, 256, 8192, torch.bfloat16)
    # The bound counts the largest bucket's working set: MBs to a few hundred, not GBs, for 256 sequences.
    assert 50 * 2**20 < reserve < 2**30, reserve
    assert kv_blocks(config(), LLAMA_405B, gpu=True) == (20 * 2**30 - reserve) // per_block
    # Twice the sequences, about twice the bound.
    assert 1.8 < graph_memory_bound(LLAMA_405B, 8, 512, 8192, torch.bfloat16) / reserve < 2.2


def test_a_budget_the_graphs_fill_names_them():
    tiny = ServeConfig.from_dict({**config().to_dict(), "kv_cache": {"memory_per_shard": "64MiB", "block_size": 16}})
    with pytest.raises(KVBudgetError, match=r"less \d+ bytes for the CUDA graphs \(shard.cuda_graphs\)"):
        kv_blocks(tiny, LLAMA_405B, gpu=True)
    assert kv_blocks(tiny, LLAMA_405B, gpu=False) > 0


def test_a_draft_models_kv_beside_rank_0_counts_in_each_block():
    """Llama 3.2 1B's shape as the draft of 405B at TP 8 x PP 2: its KV for a token (16 layers x 8 KV heads
    x 64 dims, unsharded) is about as large as a 405B shard's (63 layers x 1 KV head x 128 dims), so the draft
    about halves the blocks a 20 GiB budget holds."""
    draft = dataclasses.replace(LLAMA_405B, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                                num_kv_heads=8, head_dim=64)
    per_block = 63 * 16 * 128 * 2 * 2
    draft_per_block = 16 * 16 * 8 * 64 * 2 * 2
    cfg = config(cuda_graphs=False)
    assert kv_blocks(cfg, LLAMA_405B, gpu=True, draft=draft) == 20 * 2**30 // (per_block + draft_per_block)
    assert kv_blocks(cfg, LLAMA_405B, gpu=True, draft=None) == 20 * 2**30 // per_block
