"""Decode steps as CUDA graphs: on a GPU, launching a decode step's few hundred small kernels one by
one from Python costs more than half the step (issue 11: 0.654 ms a layer eager, 0.274 ms replayed
as a graph, for 405B's TP-8 layer at batch 1). So at start the stage's decode forward is captured
once per batch-size bucket (1, 2, 4, then multiples of 8 up to the largest batch, as vLLM does);
a step pads its rows up to the next bucket and replays that graph. A row is a decode, or one of
the 1 + k tokens of a speculative verification (`shard.attention`'s decode rows), so verify steps
replay the same graphs: a bucket of b rows serves b decodes, or b / (k + 1) verifications. Everything the step varies
(token ids or hidden states, positions, cache slots, block tables, context lengths) lives in static
buffers that are refilled before the replay, and nothing inside the captured region reads a
device value on the host: the decode attention is the Triton kernel, bounded by the block table's
width, not by the longest context. Rows above the largest bucket, a prefill (a chunk of more than
`MAX_DECODE_ROWS` tokens), or a context past `max_context` run eagerly.

Padding rows decode token 0 at position 0 into a pad block that no sequence owns (the KV cache has
one more block than the engine's), so they never touch a real sequence's cache.

The capture itself is a `GraphBackend`: `CudaGraphBackend` on a GPU; tests inject one that
replays eagerly, so the bucket choice, the padding and the fallback are checked on a CPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from shard.attention import MAX_DECODE_ROWS, AttentionMetadata, KVCache


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to `max_batch`, and `max_batch` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes = {b for b in (1, 2, 4) if b <= max_batch} | set(range(8, max_batch + 1, 8)) | {max_batch}
    return sorted(sizes)


def graph_memory_bound(cfg, tp: int, max_batch: int, max_context: int, dtype: torch.dtype) -> int:
    """An upper bound of what the graphs of a stage hold on one TP rank, known before any is captured,
    so that the KV budget can leave room for them: all buckets share one pool, which the largest
    bucket's step fills. That step keeps at most a layer's working set at once (a handful of
    [batch, widest projection] tensors; eight are counted), the decode attention's per-split
    partials (float32), the static buffers, and on the last stage the full-vocabulary logits."""
    heads = cfg.num_heads // tp
    kv_heads = max(1, cfg.num_kv_heads // tp)
    widest = max(cfg.hidden_size, (heads + 2 * kv_heads) * cfg.head_dim, 2 * cfg.intermediate_size // tp)
    itemsize = torch.empty((), dtype=dtype).element_size()
    splits = -(-max_context // 512)
    activations = 8 * max_batch * widest * itemsize
    attention = max_batch * heads * splits * (cfg.head_dim + 1) * 4
    buffers = max_batch * (cfg.hidden_size * itemsize + 8 * (3 + max_context // 16 + 1))
    logits = max_batch * cfg.vocab_size * 4 * 2
    return activations + attention + buffers + logits


def bucket_for(rows: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds `rows`, or None above the largest."""
    i = bisect.bisect_left(buckets, rows)
    return buckets[i] if i < len(buckets) else None


class GraphBackend(Protocol):
    def capture(self, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Captures `forward` (reading only static buffers); returns a replay that reruns it and
        returns its (static) output."""

    def memory_bytes(self) -> int:
        """Device memory the captured graphs hold."""


class CudaGraphBackend:
    """torch.cuda.CUDAGraph, all graphs in one memory pool (captured largest first, so the smaller
    ones reuse its blocks)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self._before = torch.cuda.memory_reserved(device)

    def capture(self, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):   # warm-up outside the graph: Triton compiles, cuBLAS plans
            forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward()
        self.graphs.append(graph)

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay

    def memory_bytes(self) -> int:
        return torch.cuda.memory_reserved(self.device) - self._before


class DecodeGraphRunner:
    """Replays captured decode steps of `model` (a `LlamaStage`) over `cache`, whose block
    `pad_block` is reserved for padding rows."""

    def __init__(self, model, cache: KVCache, backend: GraphBackend, *, max_batch: int, max_context: int,
                 pad_block: int):
        device = cache.k.device
        self.model, self.cache, self.backend = model, cache, backend
        self.buckets = batch_buckets(max_batch)
        self.block_size = cache.block_size
        self.width = -(-max_context // cache.block_size)           # block-table columns
        self.max_context = self.width * cache.block_size
        self.pad_block = pad_block
        n = self.buckets[-1]
        first = model.embed_tokens is not None
        self.x = (torch.zeros(n, dtype=torch.int64, device=device) if first else
                  torch.zeros(n, model.cfg.hidden_size, dtype=model.dtype, device=device))
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.zeros(n, dtype=torch.int64, device=device)
        self.tables = torch.zeros(n, self.width, dtype=torch.int64, device=device)
        self.kv_lens = torch.ones(n, dtype=torch.int64, device=device)
        rows = torch.arange(n, device=device)
        self._pad_rows(0, n)
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}
        for b in reversed(self.buckets):
            meta = AttentionMetadata(
                query_lens=[1] * b, context_lens=[0] * b, slot_mapping=self.slots[:b], block_tables=self.tables[:b],
                prefill_ids=[], decode_ids=rows[:b], decode_token_index=rows[:b], decode_mask=None,
                decode_kv_lens=self.kv_lens[:b], starts=list(range(b)), decode_max_kv_len=self.max_context,
                static=True)
            self.graphs[b] = backend.capture(self._forward(b, meta))
        self._pad_rows(0, n)  # the captures' warm-up wrote into the pad block only; the buffers start clean

    def _forward(self, b: int, meta: AttentionMetadata) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            return self.model(self.x[:b], self.positions[:b], meta, self.cache)
        return forward

    def _pad_rows(self, start: int, end: int) -> None:
        self.x[start:end] = 0
        self.positions[start:end] = 0
        self.slots[start:end] = self.pad_block * self.block_size
        self.tables[start:end] = self.pad_block
        self.kv_lens[start:end] = 1

    def bucket(self, rows: int) -> int | None:
        return bucket_for(rows, self.buckets)

    def takes(self, query_lens: Sequence[int], context_lens: Sequence[int]) -> bool:
        """Whether a step with these sequences replays a graph: every new token a decode row (a
        decode, or a verification's 1 + k tokens: at most `MAX_DECODE_ROWS` a sequence), at most the
        largest bucket of rows, every sequence's keys inside the block tables' width."""
        return (0 < sum(query_lens) <= self.buckets[-1] and max(query_lens) <= MAX_DECODE_ROWS
                and all(c + q <= self.max_context for c, q in zip(context_lens, query_lens)))

    def run(self, x: torch.Tensor, context_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
            query_lens: Sequence[int] | None = None) -> torch.Tensor:
        """The stage's output for a step that `takes` accepts (`query_lens`: new tokens a sequence, 1
        each by default): x is [n] token ids (first stage) or [n, hidden] for its n rows, packed by
        sequence; returns those n rows' output (logits on the last stage, hidden states elsewhere).
        Row j of a sequence after c cached tokens is position c + j, over c + j + 1 keys: the rows of
        one sequence share its block table."""
        counts = torch.as_tensor(query_lens if query_lens is not None else [1] * len(context_lens), dtype=torch.int64)
        n = int(counts.sum())
        b = self.bucket(n)
        assert b is not None and x.shape[0] == n
        bs = self.block_size
        table = torch.zeros(len(context_lens), self.width, dtype=torch.int64)
        for i, t in enumerate(block_tables):
            table[i, :len(t)] = torch.as_tensor(t[:self.width], dtype=torch.int64)
        seq = torch.repeat_interleave(torch.arange(len(counts)), counts)
        first_row = torch.cumsum(counts, 0) - counts
        pos = torch.as_tensor(context_lens, dtype=torch.int64)[seq] + torch.arange(n) - first_row[seq]
        table = table[seq]
        slots = table.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
        self.x[:n].copy_(x, non_blocking=True)
        self.positions[:n].copy_(pos, non_blocking=True)
        self.slots[:n].copy_(slots, non_blocking=True)
        self.tables[:n].copy_(table, non_blocking=True)
        self.kv_lens[:n].copy_(pos + 1, non_blocking=True)
        self._pad_rows(n, b)
        return self.graphs[b]()[:n]
