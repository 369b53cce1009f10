"""Paged KV cache and attention over it, for batches that mix prefills of any length with decodes.

The cache is a pool of fixed-size blocks per layer; a sequence owns a list of blocks (its block
table), so memory is allocated as sequences grow and freed without fragmentation. Which blocks
a sequence owns is decided by the engine's block manager; this module only reads and writes.

A step's tokens are packed: all sequences' new tokens in one [T, ...] tensor, so every GEMM of
the layer runs once for the whole batch. Only attention looks at sequences one by one: prefills
(more than `MAX_DECODE_ROWS` new tokens) individually with a causal mask, every other token as a
decode row: one query over its sequence's cached keys up to itself, all rows together in one batch,
which is what keeps decode fast at large batch. A short chunk after a context (a speculative
verification, 1 + k tokens) is such rows too: row j of a chunk after c cached tokens sees c + j + 1
keys, which is the causal mask, and its keys are in the cache before attention runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shard import kernels

# The most new tokens of one sequence that are attended as decode rows rather than as a prefill. A
# 5-token verification as rows took 15-25% less time than through the prefill path on CPU (SmolLM2,
# 2 threads): the decode kernels, and no gather of the context, for a handful of queries.
MAX_DECODE_ROWS = 8

class KVCache:
    """K and V blocks for the layers of one stage: [layers, blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size


@dataclass
class AttentionMetadata:
    """Where each sequence's tokens sit in the packed batch and in the cache; built once per step
    and shared by all layers."""

    query_lens: list[int]           # new tokens per sequence
    context_lens: list[int]         # tokens already cached per sequence, before this step
    slot_mapping: torch.Tensor      # [T] flat cache slot (block * block_size + offset) per new token
    block_tables: torch.Tensor      # [B, max_blocks] int64, padded with 0
    prefill_ids: list[int]          # sequences with more than MAX_DECODE_ROWS new tokens
    decode_ids: torch.Tensor        # [D] the sequence of each decode row (one per new token of the others)
    decode_token_index: torch.Tensor  # [D] each decode row's row in the packed batch
    decode_mask: torch.Tensor | None  # [D, 1, 1, S] True where a key is visible; None when D == 0
    decode_kv_lens: torch.Tensor    # [D] keys each decode row attends to (its context and itself)
    starts: list[int]               # first row of each sequence in the packed batch
    decode_max_kv_len: int = 0      # the most keys any decode attends to (a host-side bound)
    # A CUDA graph's step: the tensors are buffers refilled before each replay, so nothing here may
    # depend on their values (decode_mask is None; decode_max_kv_len bounds the block tables' width).
    static: bool = False

    @property
    def decode_only(self) -> bool:
        """Every row of the step is a decode row (no prefill), so decode row r is row r of the batch."""
        return bool(self.query_lens) and not self.prefill_ids

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device | str | None = None) -> "AttentionMetadata":
        starts, slots, total = [], [], 0
        for qlen, ctx, table in zip(query_lens, context_lens, block_tables):
            starts.append(total)
            total += qlen
            for pos in range(ctx, ctx + qlen):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        max_blocks = max((len(t) for t in block_tables), default=0)
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int64)
        rows = [(i, j) for i, q in enumerate(query_lens) if q <= MAX_DECODE_ROWS for j in range(q)]
        decode = [i for i, _ in rows]
        mask = None
        kv_len = torch.tensor([context_lens[i] + j + 1 for i, j in rows], dtype=torch.int64)
        if decode:
            # Only as many blocks as the longest decoding sequence needs, not the whole table.
            span = -(-int(kv_len.max()) // block_size) * block_size
            mask = (torch.arange(span)[None, :] < kv_len[:, None])[:, None, None, :].to(device)
        return cls(
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=tables.to(device),
            prefill_ids=[i for i, q in enumerate(query_lens) if q > MAX_DECODE_ROWS],
            decode_ids=torch.tensor(decode, dtype=torch.int64, device=device),
            decode_token_index=torch.tensor([starts[i] + j for i, j in rows], dtype=torch.int64, device=device),
            decode_mask=mask,
            decode_kv_lens=kv_len.to(device),
            starts=starts,
            decode_max_kv_len=int(kv_len.max()) if decode else 0,
        )


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, *,
                    cached: bool = False) -> torch.Tensor:
    """q: [T, H, D], k and v: [T, KV, D] for the new tokens; k_cache, v_cache: one layer's
    [blocks, block_size, KV, D]. Writes k and v into the cache (unless `cached`: a fused kernel
    already did), returns [T, H, D]."""
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if not cached:
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    # Decode-only steps (the common case) return the batched result directly and need no buffer.
    out = torch.empty_like(q) if meta.prefill_ids else None
    for i in meta.prefill_ids:
        start, qlen, ctx = meta.starts[i], meta.query_lens[i], meta.context_lens[i]
        if ctx == 0:
            ki, vi = k[start:start + qlen], v[start:start + qlen]
        else:
            # A later chunk of a chunked prefill: earlier chunks' keys come from the cache.
            blocks = meta.block_tables[i, : -(-(ctx + qlen) // block_size)]
            ki = k_cache.index_select(0, blocks).flatten(0, 1)[: ctx + qlen]
            vi = v_cache.index_select(0, blocks).flatten(0, 1)[: ctx + qlen]
        out[start:start + qlen] = prefill_attention(q[start:start + qlen], ki, vi, ctx, scale)

    if meta.decode_mask is None and not meta.static:
        return out
    heads = q.shape[1]
    if (lib := kernels.cpu_lib(q)) is not None and kernels.cpu.attention_fits(heads, head_dim):
        od = kernels.cpu.paged_decode_attention(q, meta.decode_token_index, k_cache, v_cache, meta.block_tables,
                                                meta.decode_ids, meta.decode_kv_lens, scale, lib)
    elif (tk := kernels.triton_for(q, "decode_attention")) is not None and tk.attention_fits(heads, kv_heads,
                                                                                            head_dim):
        # Reads each sequence's blocks where they lie: no gather copy, no mask.
        od = tk.paged_decode_attention(q, meta.decode_token_index, meta.decode_ids, meta.decode_kv_lens,
                                       meta.block_tables, k_cache, v_cache, scale, meta.decode_max_kv_len)
    else:
        if meta.static:
            raise RuntimeError("a CUDA graph's decode step needs the Triton paged decode attention "
                               "(shard.kernels.triton), which is off or does not take these shapes")
        span_blocks = meta.decode_mask.shape[-1] // block_size
        tables = meta.block_tables[meta.decode_ids, :span_blocks].flatten()  # [D * nb]
        # index_select, not k_cache[tables]: advanced indexing is ~10x slower on CPU here.
        kd = k_cache.index_select(0, tables).view(len(meta.decode_ids), -1, kv_heads, head_dim).transpose(1, 2)
        vd = v_cache.index_select(0, tables).view(len(meta.decode_ids), -1, kv_heads, head_dim).transpose(1, 2)
        qd = (q if out is None else q[meta.decode_token_index]).unsqueeze(2)  # [D, H, 1, D]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale,
                                            enable_gqa=True).squeeze(2)
    if out is None:
        return od  # rows are already in batch order
    out[meta.decode_token_index] = od
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int, scale: float) -> torch.Tensor:
    """One sequence's new tokens q [q, H, D] over its keys k, v [ctx + q, KV, D] (the first `ctx`
    cached), causal. Returns [q, H, D].

    The call is 4-D ([1, heads, tokens, D]): with 3-D tensors PyTorch's CUDA dispatch takes the math
    fallback (57x slower at 8,192 tokens on an H200), with a batch dimension the flash or efficient
    kernels. Grouped-query heads are not repeated (`enable_gqa`), except for fp32 on CUDA: no fused
    kernel takes that pair (flash wants half precision, the efficient kernel equal heads), so fp32,
    a correctness mode, repeats K/V to reach the efficient kernel. A later chunk's causal mask is
    the lower-right aligned one (query i sees keys up to ctx + i), which the fused kernels take."""
    qlen, heads, _ = q.shape
    q4, k4, v4 = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    gqa = k.shape[1] != heads
    if gqa and q.is_cuda and q.dtype == torch.float32:
        k4, v4 = (t.repeat_interleave(heads // k.shape[1], dim=1) for t in (k4, v4))
        gqa = False
    mask = _lower_right_causal(qlen, ctx, q.device) if ctx else None
    o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, is_causal=not ctx, scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)


def _lower_right_causal(qlen: int, ctx: int, device: torch.device):
    """The mask of a chunk after `ctx` cached tokens: query i sees keys 0 .. ctx + i. On CUDA it is
    PyTorch's lower-right causal bias, which the flash kernel takes; imported here, not at module
    load, because it pulls in torch._dynamo (1.3 s of every shard process's start on CPU). On CPU a
    boolean mask, which every CPU kernel takes."""
    if device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right
        return causal_lower_right(qlen, ctx + qlen)
    return torch.ones(qlen, ctx + qlen, dtype=torch.bool, device=device).tril(diagonal=ctx)
