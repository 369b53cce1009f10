"""Synthetic Llama 3.1-architecture checkpoints with random weights, saved by `transformers`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_llama(path: Path, *, layers: int = 6, heads: int = 8, kv_heads: int = 2, head_dim: int = 16,
               intermediate: int = 256, vocab: int = 1003, tie: bool = False, seed: int = 0,
               std: float = 0.08) -> Path:
    """A random Llama with llama3 RoPE scaling. A wider init than training's 0.02 keeps the
    logits peaked, so greedy decoding does not sit on near-ties that float rounding could flip.
    The odd vocabulary exercises the vocab-parallel padding."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=1, eos_token_id=2, initializer_range=std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)  # not all ones, so a norm loaded wrong shows
    model.save_pretrained(path, safe_serialization=True)
    return path
