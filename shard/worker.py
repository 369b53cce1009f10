"""ShardWorker: what one GPU (one CPU slot here) runs. It owns its stage's weights and KV cache
and executes steps; it does not schedule. Whatever delivers a step to every rank (a local
launcher, a Ray actor call) and whatever decides which sequences run (the engine) live above.

Within a step, hidden states flow stage to stage over torch.distributed send/recv; only the last
stage returns something: the sampled token of each sequence that asked for one (a token at every
position of a chunk that carries a speculative draft, for the engine to verify).

With `cuda_graphs` on a GPU, decode steps replay graphs captured at start (`shard.graphs`); the
KV cache then holds one more block than `num_blocks`, for the graphs' padding rows, and
`graph_memory_bytes` says what the graphs hold. Everything else runs eagerly.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shard.attention import AttentionMetadata
from shard import kernels
from shard.config import ModelConfig
from shard.graphs import CudaGraphBackend, DecodeGraphRunner, GraphBackend, graph_memory_bound
from shard.loader import Checkpoint, LoadReport, load_weights
from shard.model import LlamaStage
from shard.parallel import ParallelContext
from shard.sampler import Sample, SamplingParams, sample


@dataclass
class SeqChunk:
    """One sequence's part of a step: the new tokens to run (a prompt chunk, or the last sampled
    token), where they start (`context_len` tokens are already cached) and where they go.
    `block_table` may be the scheduler's own list, which can grow while the step runs (the next
    step is scheduled meanwhile): a step reads only the blocks its tokens need."""

    seq_id: int
    token_ids: list[int]
    context_len: int
    block_table: list[int]
    params: SamplingParams | None = None  # None: no token is wanted yet (a non-final prompt chunk)
    output_index: int = 0                 # tokens this sequence has generated so far
    # Speculative decoding: the last `num_draft` tokens are proposed, not yet the model's; a token is
    # sampled at each of the last num_draft + 1 positions, for the engine to verify the proposal.
    num_draft: int = 0
    # Constrained decoding: the tokens this chunk's (first) sample may be, one bit per vocabulary id
    # packed in little-endian int32 words (`cluster.engine.grammar`); None: any token.
    bitmask: bytes | None = None


@dataclass
class StepInput:
    seqs: list[SeqChunk]
    return_logits: bool = False           # full-vocabulary logits of the sampled rows, for scoring and tests


@dataclass
class StepOutput:
    samples: dict[int, Sample] = field(default_factory=dict)  # seq_id -> sampled token
    logits: torch.Tensor | None = None                       # [sampled rows, vocab], in seqs order
    # seq_id -> the samples at every position of a chunk with a draft (`SeqChunk.num_draft`), in order
    verified: dict[int, list[Sample]] = field(default_factory=dict)


log = logging.getLogger(__name__)
GRAPH_MAX_CONTEXT = 8192   # longer contexts decode eagerly: the graphs' block tables (and splits) stay this wide


class ShardWorker:
    def __init__(self, model_dir: str | Path, ctx: ParallelContext, *, dtype: torch.dtype = torch.float32,
                 num_blocks: int, block_size: int = 16, progress: bool = True, cuda_graphs: bool = False,
                 graph_max_batch: int = 256, graph_backend: GraphBackend | None = None,
                 fp8_scaled_mm_min_rows: int | None = None):
        """`cuda_graphs`: capture decode steps of up to `graph_max_batch` sequences on a CUDA device
        (ignored elsewhere: there are no graphs to capture). `graph_backend` replaces the CUDA
        capture (tests use one that replays eagerly on a CPU). `fp8_scaled_mm_min_rows`: for an FP8
        checkpoint, the rows from which its GEMMs quantise the activations too (None: the default)."""
        self.ctx = ctx
        self.cfg = ModelConfig.from_pretrained(model_dir)
        if fp8_scaled_mm_min_rows is not None and self.cfg.quantization is not None:
            self.cfg = dataclasses.replace(self.cfg, quantization=dataclasses.replace(
                self.cfg.quantization, scaled_mm_min_rows=fp8_scaled_mm_min_rows))
        self.model = LlamaStage(self.cfg, ctx, dtype, ctx.device)
        self.load_report: LoadReport = load_weights(self.model, Checkpoint.open(model_dir), progress=progress)
        self.packed_bytes = self.model.prepack_linears()  # on CPU, where shard.kernels.onednn is on
        use_graphs = graph_backend is not None or (cuda_graphs and torch.device(ctx.device).type == "cuda")
        self.cache = self.model.new_kv_cache(num_blocks + use_graphs, block_size)
        self.graphs: DecodeGraphRunner | None = None
        self.graph_memory_bytes = 0
        if use_graphs:
            if graph_backend is None:
                probe = torch.empty(0, dtype=dtype, device=ctx.device)
                if kernels.triton_for(probe, "decode_attention") is None:
                    raise RuntimeError("shard.cuda_graphs needs the Triton paged decode attention: install triton "
                                       f"({kernels.why_triton_unavailable() or 'it is switched off'}), or set "
                                       "shard.cuda_graphs: false")
                graph_backend = CudaGraphBackend(torch.device(ctx.device))
            self.graphs = DecodeGraphRunner(
                self.model, self.cache, graph_backend, max_batch=graph_max_batch, pad_block=num_blocks,
                max_context=min(GRAPH_MAX_CONTEXT, self.cfg.max_position_embeddings, num_blocks * block_size))
            self.graph_memory_bytes = graph_backend.memory_bytes()
            bound = graph_memory_bound(self.cfg, ctx.tp_size, graph_max_batch, self.graphs.max_context, dtype)
            if self.graph_memory_bytes > bound:
                log.warning("the CUDA graphs hold %d bytes, more than the %d bytes the KV budget left for them "
                            "(shard.graphs.graph_memory_bound): lower kv_cache.memory_per_shard by the difference",
                            self.graph_memory_bytes, bound)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput | None:
        seqs, device = step.seqs, self.ctx.device
        query_lens = [len(s.token_ids) for s in seqs]
        contexts = [s.context_len for s in seqs]
        wanted = [i for i, s in enumerate(seqs) if s.params is not None]
        size = self.cache.block_size
        tables = [s.block_table[:-(-(s.context_len + len(s.token_ids)) // size)] for s in seqs]
        ends = list(itertools.accumulate(query_lens))
        # The last row of each sampled chunk, and the num_draft rows before it for a chunk to verify.
        rows = torch.tensor([ends[i] - 1 - d for i in wanted for d in range(seqs[i].num_draft, -1, -1)],
                            dtype=torch.int64, device=device)
        graphed = self.graphs is not None and self.graphs.takes(query_lens, contexts)
        if self.ctx.is_first_stage:
            x = torch.tensor([t for s in seqs for t in s.token_ids], device=None if graphed else device)
        else:
            x = self.ctx.recv_prev((ends[-1], self.cfg.hidden_size), self.model.dtype)
        if graphed:  # decodes and verifications, as decode rows
            out = self.graphs.run(x, contexts, tables, query_lens)
            return self._finish(step, out if not self.ctx.is_last_stage else out[rows], wanted)
        meta = AttentionMetadata.build(query_lens, contexts, tables, size, device)
        positions = torch.tensor([p for s in seqs for p in range(s.context_len, s.context_len + len(s.token_ids))],
                                 device=device)
        return self._finish(step, self.model(x, positions, meta, self.cache, logit_rows=rows), wanted)

    def _finish(self, step: StepInput, out: torch.Tensor, wanted: list[int]) -> StepOutput | None:
        """Hands hidden states to the next stage, or samples the logits of the `wanted` sequences."""
        seqs = step.seqs
        if not self.ctx.is_last_stage:
            self.ctx.send_next(out)
            return None
        rows = [(seqs[i], d) for i in wanted for d in range(seqs[i].num_draft + 1)]  # as the logits' rows
        samples = sample(out, [c.params for c, _ in rows], [c.output_index + d for c, d in rows],
                         [c.bitmask if d == 0 else None for c, d in rows])
        result = StepOutput(logits=out.cpu() if step.return_logits else None)
        for (chunk, d), smp in zip(rows, samples):
            if d == 0:
                result.samples[chunk.seq_id] = smp
            if chunk.num_draft:
                result.verified.setdefault(chunk.seq_id, []).append(smp)
        return result
