"""Triton kernels for the small operators of a decoder layer on CUDA, where PyTorch launches several
kernels and passes over memory for what is one pass:

- `paged_decode_attention`: each decode row attends to its keys where they lie in the paged cache
  (no gather copy), split over the context in the manner of flash-decoding so that a long
  sequence keeps many SMs busy; a second kernel merges the splits by their log-sum-exp.
- `add_rms_norm`: the residual add and the RMSNorm after it, one read of each input.
- `rope_kv_write_`: RoPE of q and k in place and the new k and v into their cache slots.
- `silu_mul`: silu(gate) * up.

Only long-standing `tl` operations are used (load/store with masks, dot, exp, max, sum, where), so
the same file runs on the H200's triton 3.6, CI's newer triton and its CPU interpreter
(`TRITON_INTERPRET=1`, read when this module is imported). Rounding follows the PyTorch path's:
fp32 inside, half precision where PyTorch rounds (see each kernel). `shard.kernels` decides where
each kernel is used; `tests/shard/test_triton_kernels.py` holds each one to the PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 32                 # keys per step of the attention loop (a multiple of 16 for tl.dot)
SPLIT_TOKENS = 512        # keys per split of a long context; shorter contexts run in one split
MAX_SPLITS = 32


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


def attention_fits(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether `paged_decode_attention` takes these per-rank shapes."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and heads % kv_heads == 0 and heads // kv_heads <= 128


def num_splits(max_kv_len: int) -> int:
    """Splits of the context for keys up to `max_kv_len` (a bound the host knows without reading
    the device: the block table's width under CUDA graphs)."""
    return max(1, min(MAX_SPLITS, -(-max_kv_len // SPLIT_TOKENS)))


@triton.jit
def _paged_decode_split(q_ptr, q_row_stride, row_index_ptr, seq_index_ptr, kv_lens_ptr, tables_ptr, table_stride,
                        k_cache, v_cache, block_stride, slot_stride, head_stride, scale, out_ptr, lse_ptr,
                        split_tokens, num_splits,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, TILE_K: tl.constexpr, PRECISION: tl.constexpr):
    # One program: one decode row, one KV head (all GROUP query heads that share it), one split.
    d, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = tl.num_programs(1) * GROUP
    row = tl.load(row_index_ptr + d).to(tl.int64)
    seq = tl.load(seq_index_ptr + d).to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + d)
    g = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    head = kvh * GROUP + g
    q = tl.load(q_ptr + row * q_row_stride + head[:, None] * HEAD_DIM + dims[None, :],
                mask=(g < GROUP)[:, None], other=0.0).to(tl.float32)                       # [G, D]
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, kv_len)
    for t0 in range(start, end, TILE_K):
        t = t0 + tl.arange(0, TILE_K)
        valid = t < end
        block = tl.load(tables_ptr + seq * table_stride + t // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        where = block * block_stride + (t % BLOCK_SIZE) * slot_stride + kvh * head_stride   # [TILE]
        k_t = tl.load(k_cache + where[None, :] + dims[:, None], mask=valid[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, k_t, input_precision=PRECISION) * scale                                # k_t: [D, TILE]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + where[:, None] + dims[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)                 # [G, D]
        m = m_new
    # An empty split (start past kv_len) leaves l == 0: its weight is exp(-inf) = 0 in the merge.
    safe_l = tl.where(l > 0, l, 1.0)
    lse = tl.where(l > 0, m + tl.log(safe_l), float("-inf"))
    part = (d * heads + head) * num_splits + split                                          # [G]
    tl.store(out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc / safe_l[:, None], mask=(g < GROUP)[:, None])
    tl.store(lse_ptr + part, lse, mask=g < GROUP)


@triton.jit
def _merge_splits(part_ptr, lse_ptr, out_ptr, num_splits, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
    # One program: one decode row and query head; the splits' outputs weighted by exp(lse).
    i = tl.program_id(0).to(tl.int64)        # row * heads + head
    s = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + i * num_splits + s, mask=s < num_splits, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))
    parts = tl.load(part_ptr + (i * num_splits + s)[:, None] * HEAD_DIM + dims[None, :], mask=(s < num_splits)[:, None],
                    other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + i * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, row_index: torch.Tensor, seq_index: torch.Tensor, kv_lens: torch.Tensor,
                           block_tables: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                           max_kv_len: int) -> torch.Tensor:
    """q: [T, H, D] (rows may be strided, heads contiguous); row `row_index[d]` decodes sequence
    `seq_index[d]` (a row of block_tables [B, width]) over its first `kv_lens[d]` cached keys in
    k_cache, v_cache [blocks, block_size, KV, D]. `max_kv_len` bounds every kv_lens (a host-side
    number, so no device read). Returns [len(row_index), H, D].

    The dots run on fp32 tiles: in IEEE precision for fp32 caches; for half-precision caches in
    TF32, whose 10-bit mantissa holds every bf16 value exactly (so q.k is exact) and the
    probabilities more finely than bf16 would, on the tensor cores."""
    _, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert q.stride(2) == 1 and q.stride(1) == head_dim and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(3) == 1 and attention_fits(heads, kv_heads, head_dim)
    rows, group = row_index.shape[0], heads // kv_heads
    splits = num_splits(max_kv_len)
    split_tokens = -(-max(max_kv_len, 1) // (splits * TILE)) * TILE
    part = torch.empty(rows, heads, splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(rows, heads, head_dim, dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    _paged_decode_split[(rows, kv_heads, splits)](
        q, q.stride(0), row_index, seq_index, kv_lens, block_tables, block_tables.stride(0), k_cache, v_cache,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), scale, part, lse, split_tokens, splits,
        GROUP=group, GROUP_PAD=_pow2(group, 16), HEAD_DIM=head_dim, BLOCK_SIZE=block_size, TILE_K=TILE,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    _merge_splits[(rows * heads,)](part, lse, out, splits, HEAD_DIM=head_dim, SPLITS_PAD=_pow2(splits))
    return out


@triton.jit
def _add_rms_norm(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, n, eps,
                  HAS_RESIDUAL: tl.constexpr, FP32: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the stream's dtype before it is normalised, as `h = h + attn` is.
        r = tl.load(residual_ptr + row * n + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    normed = xf * tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    if FP32:
        y = normed * w
    else:
        # Half precision: the normalised value is rounded before the weight scales it (RMSNorm.forward).
        y = normed.to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * n + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) for x [T, n]; without a residual, (rms_norm(x) * weight, x)."""
    assert x.is_contiguous() and (residual is None or residual.is_contiguous())
    rows, n = x.shape
    out = torch.empty_like(x)
    total = x if residual is None else torch.empty_like(x)
    if rows:
        block = _pow2(n)
        _add_rms_norm[(rows,)](x, x if residual is None else residual, weight, out, total, n, eps,
                               HAS_RESIDUAL=residual is not None, FP32=x.dtype == torch.float32, BLOCK=block,
                               num_warps=min(16, max(1, block // 512)))
    return out, total


@triton.jit
def _rope_kv_write(qkv_ptr, row_stride, cos_ptr, sin_ptr, slots_ptr, k_cache, v_cache, slot_stride, rotated_heads,
                   kv_heads, HALF: tl.constexpr, HEADS_PAD: tl.constexpr):
    # One program: one token, all its heads. Heads [0, rotated_heads) are q then k (rotated in
    # place); the k heads and the v heads after them also go to the token's cache slot.
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)
    j = tl.arange(0, HALF)
    rot = (h < rotated_heads)[:, None]
    base = qkv_ptr + t * row_stride + h[:, None] * (2 * HALF) + j[None, :]
    x1 = tl.load(base, mask=rot, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=rot, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * 2 * HALF + j).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * 2 * HALF + HALF + j).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * 2 * HALF + j).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * 2 * HALF + HALF + j).to(tl.float32)[None, :]
    y1 = (x1 * c1 - x2 * s1).to(qkv_ptr.dtype.element_ty)
    y2 = (x2 * c2 + x1 * s2).to(qkv_ptr.dtype.element_ty)
    tl.store(base, y1, mask=rot)
    tl.store(base + HALF, y2, mask=rot)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:  # a negative slot: a padding row of a CUDA graph, with nothing to cache
        q_heads = rotated_heads - kv_heads
        kh = h - q_heads                                   # this head's index among the k heads
        is_k = ((kh >= 0) & (kh < kv_heads))[:, None]
        dst = slot.to(tl.int64) * slot_stride + kh[:, None] * (2 * HALF) + j[None, :]
        tl.store(k_cache + dst, y1, mask=is_k)
        tl.store(k_cache + dst + HALF, y2, mask=is_k)
        is_v = (h < kv_heads)[:, None]
        v_src = qkv_ptr + t * row_stride + (rotated_heads + h)[:, None] * (2 * HALF) + j[None, :]
        v_dst = slot.to(tl.int64) * slot_stride + h[:, None] * (2 * HALF) + j[None, :]
        tl.store(v_cache + v_dst, tl.load(v_src, mask=is_v, other=0.0), mask=is_v)
        tl.store(v_cache + v_dst + HALF, tl.load(v_src + HALF, mask=is_v, other=0.0), mask=is_v)


def rope_kv_write_(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                   slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """qkv [T, heads + 2 kv_heads, D] (contiguous): q and k rotated in place (cos, sin: [T, D]);
    token t's k and v written to slot `slot_mapping[t]` of k_cache, v_cache [blocks, block_size,
    kv_heads, D] (skipped where the slot is negative)."""
    T, all_heads, head_dim = qkv.shape
    assert qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and all_heads == heads + 2 * kv_heads
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and head_dim % 2 == 0
    half = head_dim // 2
    assert half & (half - 1) == 0, "head_dim must be a power of two"
    if T:
        _rope_kv_write[(T,)](qkv, qkv.stride(0), cos, sin, slot_mapping, k_cache, v_cache, kv_heads * head_dim,
                             heads + kv_heads, kv_heads, HALF=half, HEADS_PAD=_pow2(heads + kv_heads))


@triton.jit
def _silu_mul(gate_up_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gate_up_ptr + row * 2 * inter + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # silu rounded to the dtype before the product, as F.silu(gate) * up rounds.
    act = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * inter + cols, act.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2 * inter] (gate first); returns [T, inter]."""
    assert gate_up.is_contiguous()
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, _pow2(inter))
        _silu_mul[(rows, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block)
    return out
