"""LlamaStage: the decoder layers [start, end) that one pipeline rank owns, TP-sharded.

The first stage also owns the embedding; the last the final norm and the LM head. Global sizes
come from the config (`cfg.num_heads`); per-rank sizes are named `local_*`.
"""

from __future__ import annotations

import torch
from torch import nn

from shard import cpu_path, kernels, quant
from shard.kernels import cpu as cpu_kernels
from shard.kernels import onednn
from shard.attention import AttentionMetadata, KVCache, paged_attention
from shard.config import ModelConfig
from shard.kernels.fp8 import FP8Gemm
from shard.layers import (ColumnParallelLinear, Part, RMSNorm, RotaryEmbedding, RowParallelLinear, TensorSlice,
                          VocabParallel, apply_rotary_, prepack, split)
from shard.layout import check_layout, model_stage_layers
from shard.parallel import ParallelContext


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """KV heads each rank holds: a share of them, or one replicated head when TP exceeds them."""
    return max(1, cfg.num_kv_heads // tp)


def rank_kv_bytes_per_token(cfg: ModelConfig, tp: int, num_layers: int, itemsize: int) -> int:
    """One token's K and V on a rank of a TP-`tp` stage holding `num_layers` layers."""
    return 2 * num_layers * kv_heads_per_rank(cfg, tp) * cfg.head_dim * itemsize


def kv_part(cfg: ModelConfig, tp: int, tp_rank: int) -> Part:
    rows = cfg.kv_size
    if tp <= cfg.num_kv_heads:
        return split(rows, tp, tp_rank)
    head = tp_rank // (tp // cfg.num_kv_heads)  # consecutive ranks share one KV head
    return Part(rows, head * cfg.head_dim, cfg.head_dim)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, device, fp8: dict[str, FP8Gemm]):
        super().__init__()
        tp, r = ctx.tp_size, ctx.tp_rank
        self.ctx = ctx
        self.local_heads = cfg.num_heads // tp
        self.local_kv_heads = kv_heads_per_rank(cfg, tp)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        kv = kv_part(cfg, tp, r)
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [split(cfg.q_size, tp, r), kv, kv],
                                             dtype=dtype, device=device, fp8=fp8.get("self_attn.qkv_proj"))
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, tp, r, dtype=dtype, device=device,
                                        fp8=fp8.get("self_attn.o_proj"))

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        T, H, KV = x.shape[0], self.local_heads, self.local_kv_heads
        qkv = self.qkv_proj(x).view(T, H + 2 * KV, self.head_dim)
        if cached := (tk := kernels.triton_for(qkv, "rope_kv_write")) is not None:
            tk.rope_kv_write_(qkv, H, KV, cos, sin, meta.slot_mapping, k_cache, v_cache)  # and k, v to the cache
        else:
            apply_rotary_(qkv, H + KV, cos, sin)          # q and k rotated together, in place
        q, k, v = qkv[:, :H], qkv[:, H:H + KV], qkv[:, H + KV:]   # [T, H, D], [T, KV, D], [T, KV, D]
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, cached=cached)
        return self.ctx.all_reduce(self.o_proj(out.view(T, -1)))

    def checkpoint_slices(self, prefix: str) -> dict[str, list[TensorSlice]]:
        return {
            "qkv_proj.weight": self.qkv_proj.checkpoint_slices(
                [f"{prefix}.q_proj.weight", f"{prefix}.k_proj.weight", f"{prefix}.v_proj.weight"]),
            "o_proj.weight": self.o_proj.checkpoint_slices(f"{prefix}.o_proj.weight"),
        }


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, device, fp8: dict[str, FP8Gemm]):
        super().__init__()
        tp, r = ctx.tp_size, ctx.tp_rank
        self.ctx = ctx
        part = split(cfg.intermediate_size, tp, r)
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [part, part], dtype=dtype, device=device,
                                                 fp8=fp8.get("mlp.gate_up_proj"))
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp, r, dtype=dtype, device=device,
                                           fp8=fp8.get("mlp.down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if (lib := kernels.cpu_lib(gate_up)) is not None:
            act = cpu_kernels.silu_mul(gate_up, lib)
        elif (tk := kernels.triton_for(gate_up, "silu_mul")) is not None:
            act = tk.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = torch.nn.functional.silu(gate) * up
        return self.ctx.all_reduce(self.down_proj(act))

    def checkpoint_slices(self, prefix: str) -> dict[str, list[TensorSlice]]:
        return {
            "gate_up_proj.weight": self.gate_up_proj.checkpoint_slices(
                [f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"]),
            "down_proj.weight": self.down_proj.checkpoint_slices(f"{prefix}.down_proj.weight"),
        }


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, device,
                 fp8: dict[str, FP8Gemm]):
        super().__init__()
        self.fp8 = bool(fp8)  # linears kept FP8 (`shard.quant.resident_linears`), by module in the layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = Attention(cfg, ctx, dtype, device, fp8)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.mlp = MLP(cfg, ctx, dtype, device, fp8)

    def forward(self, h, cos, sin, k_cache, v_cache, meta) -> torch.Tensor:
        if (lib := self._decode_kernels(h, meta)) is not None:
            return self._forward_decode_on_cpu(lib, h, cos, sin, k_cache, v_cache, meta)
        attn = self.self_attn(self.input_layernorm(h), cos, sin, k_cache, v_cache, meta)
        h, x = self.post_attention_layernorm.add_forward(attn, h)    # h + attn, and its norm
        return h + self.mlp(x)

    def _decode_kernels(self, h: torch.Tensor, meta: AttentionMetadata):
        """The CPU kernels, where this step can run each half of the layer as one call: float32 on
        CPU, a step of at most `cpu_kernels.MAX_ROWS` decode rows and no prefill, shapes the kernels take,
        plain weights (not prepacked in place for oneDNN: `shard.cpu_path`)."""
        a = self.self_attn
        if self.fp8 or not meta.decode_only or h.shape[0] > cpu_kernels.MAX_ROWS or not cpu_kernels.attention_fits(
                a.local_heads, a.head_dim) or onednn.is_packed(a.qkv_proj.weight):
            return None
        return kernels.cpu_lib(h)

    def _forward_decode_on_cpu(self, lib, h, cos, sin, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """The same layer as `forward`'s operators, in two kernel calls (see cpu_kernels.c): at a few
        rows the dozen operators' dispatch cost as much as their arithmetic."""
        a, m = self.self_attn, self.mlp
        h = h.contiguous()
        attn = cpu_kernels.decode_attention_block(
            h, self.input_layernorm.weight, self.input_layernorm.eps, a.qkv_proj.weight, a.local_heads,
            a.local_kv_heads, cos, sin, k_cache, v_cache, meta.slot_mapping, meta.decode_token_index,
            meta.decode_ids, meta.block_tables, meta.decode_kv_lens, a.scale, a.o_proj.weight, lib)
        h = h + a.ctx.all_reduce(attn)
        mlp = cpu_kernels.mlp_block(h, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps,
                                    m.gate_up_proj.weight, m.down_proj.weight, lib)
        return h + m.ctx.all_reduce(mlp)

    def checkpoint_slices(self, prefix: str) -> dict[str, list[TensorSlice]]:
        out = {
            "input_layernorm.weight": self.input_layernorm.checkpoint_slices(f"{prefix}.input_layernorm.weight"),
            "post_attention_layernorm.weight": self.post_attention_layernorm.checkpoint_slices(
                f"{prefix}.post_attention_layernorm.weight"),
        }
        for name, sub in (("self_attn", self.self_attn), ("mlp", self.mlp)):
            out.update({f"{name}.{k}": v for k, v in sub.checkpoint_slices(f"{prefix}.{name}").items()})
        return out


class LlamaStage(nn.Module):
    """One pipeline stage of a TP-sharded Llama. `forward` takes the packed tokens of one step:
    token ids on the first stage, hidden states elsewhere; it returns hidden states, or on the
    last stage the full-vocabulary logits of the rows in `logit_rows`. `fp8_resident`: whether the
    linears of an FP8 checkpoint that can stay FP8 do (`shard.quant.resident_linears`); by default
    on CUDA only (`shard.quant.keeps_fp8`), elsewhere the loader dequantises them."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, *, fp8_resident: bool | None = None):
        super().__init__()
        check_layout(cfg, ctx.layout)
        self.cfg, self.ctx, self.dtype = cfg, ctx, dtype
        self.cpu_paths: dict[str, cpu_path.Measured] = {}  # set by `prepack_linears`
        self.layer_range = model_stage_layers(cfg, ctx.layout.pp, ctx.pp_rank)
        tp, r = ctx.tp_size, ctx.tp_rank
        self.embed_tokens = (VocabParallel(cfg.vocab_size, cfg.hidden_size, tp, r, dtype=dtype, device=device)
                             if ctx.is_first_stage else None)
        fp8 = quant.keeps_fp8(device) if fp8_resident is None else fp8_resident
        self.layers = nn.ModuleList(DecoderLayer(cfg, ctx, dtype, device, quant.resident_linears(cfg, i) if fp8 else {})
                                    for i in self.layer_range)
        self.norm = self.lm_head = None
        if ctx.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
            if cfg.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head = self.embed_tokens  # one tensor, loaded once
            else:
                self.lm_head = VocabParallel(cfg.vocab_size, cfg.hidden_size, tp, r, dtype=dtype, device=device)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device=device)

    def prepack_linears(self) -> int:
        """Prepacks the linears' weights and the LM head's for oneDNN where `shard.kernels.onednn` is
        on (see `shard.layers.prepack`); once, after loading. Returns the bytes the copies add: none
        where they replace the plain weights; the linears' whole weight where the decode kernels
        still read those (float32 with the CPU kernels, `CARAVAN_ONEDNN_LINEAR=on`). Under `auto`,
        float32 with the kernels takes per part the path `shard.cpu_path` measured faster here
        (`self.cpu_paths`), in place or not at all."""
        kernels_read = self.dtype == torch.float32 and cpu_kernels.library() is not None
        self.cpu_paths = cpu_path.choose(self)

        def plain(part: str) -> bool:
            return kernels_read and (part not in self.cpu_paths or self.cpu_paths[part].path == cpu_path.KERNELS)

        linears = [m for m in self.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
        nbytes = sum(prepack(m, keep_plain=plain("layers")) for m in linears)
        if self.lm_head is not None:
            nbytes += prepack(self.lm_head, keep_plain=plain("lm_head") or self.lm_head is self.embed_tokens)
        return nbytes

    def new_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        return KVCache(len(self.layers), num_blocks, block_size, kv_heads_per_rank(self.cfg, self.ctx.tp_size),
                       self.cfg.head_dim, dtype=self.dtype, device=self.ctx.device)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, cache: KVCache,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ctx.all_reduce(self.embed_tokens.embed(x)) if self.embed_tokens is not None else x
        if len(meta.decode_token_index) and (lib := kernels.cpu_lib(h)) is not None:  # before any kernel trusts them
            cpu_kernels.check_decode_indices(meta.decode_token_index, meta.decode_ids, meta.decode_kv_lens, h.shape[0],
                                             meta.block_tables, cache.k[0], meta.slot_mapping, lib)
        cos, sin = self.rotary(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache.k[i], cache.v[i], meta)
        if self.lm_head is None:
            return h
        h = self.norm(h if logit_rows is None else h[logit_rows])
        logits = self.ctx.all_gather_last(self.lm_head.logits(h))
        return logits[:, : self.cfg.vocab_size]

    def checkpoint_slices(self) -> dict[str, list[TensorSlice]]:
        """Parameter name -> the checkpoint slices that fill it, for this rank only."""
        out: dict[str, list[TensorSlice]] = {}
        if self.embed_tokens is not None:
            out["embed_tokens.weight"] = self.embed_tokens.checkpoint_slices("model.embed_tokens.weight")
        for local, layer in enumerate(self.layers):
            for name, slices in layer.checkpoint_slices(f"model.layers.{self.layer_range[local]}").items():
                out[f"layers.{local}.{name}"] = slices
        if self.norm is not None:
            out["norm.weight"] = self.norm.checkpoint_slices("model.norm.weight")
            if self.lm_head is not self.embed_tokens:
                head = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
                out["lm_head.weight"] = self.lm_head.checkpoint_slices(head)
        return out


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete checkpoint of this model holds, with its full shape, whatever the layout."""
    h, v = cfg.hidden_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (cfg.q_size, h),
            f"{p}.self_attn.k_proj.weight": (cfg.kv_size, h),
            f"{p}.self_attn.v_proj.weight": (cfg.kv_size, h),
            f"{p}.self_attn.o_proj.weight": (h, cfg.q_size),
            f"{p}.mlp.gate_proj.weight": (cfg.intermediate_size, h),
            f"{p}.mlp.up_proj.weight": (cfg.intermediate_size, h),
            f"{p}.mlp.down_proj.weight": (h, cfg.intermediate_size),
        }
    return shapes
