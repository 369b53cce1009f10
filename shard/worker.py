"""ShardWorker: what one GPU (one CPU slot here) runs. It owns its stage's weights and KV cache
and executes steps; it does not schedule. Whatever delivers a step to every rank (a local
launcher, a Ray actor call) and whatever decides which sequences run (the engine) live above.

Within a step, hidden states flow stage to stage over torch.distributed send/recv; only the last
stage returns something: the sampled token of each sequence that asked for one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from shard.attention import AttentionMetadata
from shard.config import ModelConfig
from shard.loader import Checkpoint, LoadReport, load_weights
from shard.model import LlamaStage
from shard.parallel import ParallelContext
from shard.sampler import Sample, SamplingParams, sample


@dataclass
class SeqChunk:
    """One sequence's part of a step: the new tokens to run (a prompt chunk, or the last sampled
    token), where they start (`context_len` tokens are already cached) and where they go."""

    seq_id: int
    token_ids: list[int]
    context_len: int
    block_table: list[int]
    params: SamplingParams | None = None  # None: no token is wanted yet (a non-final prompt chunk)
    output_index: int = 0                 # tokens this sequence has generated so far


@dataclass
class StepInput:
    seqs: list[SeqChunk]
    return_logits: bool = False           # full-vocabulary logits of the sampled rows, for scoring and tests


@dataclass
class StepOutput:
    samples: dict[int, Sample] = field(default_factory=dict)  # seq_id -> sampled token
    logits: torch.Tensor | None = None                       # [sampled seqs, vocab], in seqs order


class ShardWorker:
    def __init__(self, model_dir: str | Path, ctx: ParallelContext, *, dtype: torch.dtype = torch.float32,
                 num_blocks: int, block_size: int = 16, progress: bool = True):
        self.ctx = ctx
        self.cfg = ModelConfig.from_pretrained(model_dir)
        self.model = LlamaStage(self.cfg, ctx, dtype, ctx.device)
        self.load_report: LoadReport = load_weights(self.model, Checkpoint.open(model_dir), progress=progress)
        self.cache = self.model.new_kv_cache(num_blocks, block_size)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput | None:
        seqs, device = step.seqs, self.ctx.device
        query_lens = [len(s.token_ids) for s in seqs]
        meta = AttentionMetadata.build(query_lens, [s.context_len for s in seqs], [s.block_table for s in seqs],
                                       self.cache.block_size, device)
        positions = torch.tensor([p for s in seqs for p in range(s.context_len, s.context_len + len(s.token_ids))],
                                 device=device)
        if self.ctx.is_first_stage:
            x = torch.tensor([t for s in seqs for t in s.token_ids], device=device)
        else:
            x = self.ctx.recv_prev((len(positions), self.cfg.hidden_size), self.model.dtype)
        wanted = [i for i, s in enumerate(seqs) if s.params is not None]
        rows = torch.tensor([meta.starts[i] + query_lens[i] - 1 for i in wanted], dtype=torch.int64, device=device)
        out = self.model(x, positions, meta, self.cache, logit_rows=rows)
        if not self.ctx.is_last_stage:
            self.ctx.send_next(out)
            return None
        samples = sample(out, [seqs[i].params for i in wanted], [seqs[i].output_index for i in wanted])
        return StepOutput({seqs[i].seq_id: smp for i, smp in zip(wanted, samples)},
                          out.cpu() if step.return_logits else None)
