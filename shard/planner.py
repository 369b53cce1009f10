"""Which TP x PP x replicas layout to rent: every layout of a cluster, ranked by estimated throughput.

Layouts considered: TP divides the GPUs of a node (a TP group never crosses nodes: its two
all-reduces per layer need NVLink) and the model's heads (`shard.layout.check_layout`); TP x PP
divides the cluster's GPUs, so every GPU serves and the replicas are alike; PP is at most the layers.

Memory, per GPU: CUDA's total, less `RESERVE` of it (CUDA context, NCCL buffers, the activations of a
step, allocator slack: what vLLM's default `gpu_memory_utilization=0.9` leaves), less the rank's
weights; the rest is KV cache (BF16 whatever the weights). A replica holds as many tokens as its
tightest rank allows. A layout fits when it holds one sequence of `context` tokens.

Speed: roofline floors from peak datasheet rates (shard/gpus.py), so every estimate is a ceiling.
- A stage's decode step of b sequences: max(weights + their KV over HBM bandwidth, 2 x params x b
  over the FLOP rate), plus its TP all-reduces (2 per layer of hidden x 2 bytes x b, ring over
  NVLink). The stages run in turn, with a hand-off of hidden x 2 bytes x b between them (over the
  network where the next stage is on another node).
- Decode floor: that sum for one sequence at `context` tokens.
- Prefill floor: one prompt of `input` tokens through the stages in turn, each max(compute, weights).
- With speculation (`Workload.draft_tokens` k at acceptance rate a, the chance that each draft token
  is the target's): a verify step runs the 1 + k rows of one sequence through the stages (the weights
  and the sequence's KV read once, the compute 1 + k times), and yields (1 - a^(k+1)) / (1 - a) tokens
  on average (Leviathan et al. 2023, drafts accepted independently); the speculative decode floor is
  the one over the other. A draft model's own cost is not counted (n-gram lookup has none).
- Throughput: continuous batching at the largest batch B the KV cache holds at input + output tokens
  a sequence, split into PP micro-batches (one per stage, as the engine's lanes). Each request costs
  its prefill (amortised: stages work on different prompts at once, so the slowest stage bounds it)
  plus its share of `output` decode cycles: requests/s per replica = 1 / (prefill + output x
  cycle(B) / B). Decode reads KV at the mean context, input + output / 2. Attention FLOPs, kernel
  launch and collective latency, scheduling gaps and the sampler are left out.
Ranking: output tokens/s of the whole cluster (equivalently requests/s: one workload), since the
cluster is what is rented; ties go to the lower decode floor.

Measured efficiencies (`Measured`, `load_measured`): where a results folder (bench/results) holds a
GPU bench's measurements for the cluster's GPU and the plan's weight dtype, a decode step of b
sequences takes its floor over the fraction of the HBM roofline measured at the nearest measured
batch, and a prefill its compute floor over the fraction of the GEMM peak measured; the table and
the JSON name the files. Files read, newest first: `gpu_layer-*.json` (bench/gpu_layer.py, a whole
decoder layer) then `fp8_gemm-*.json` (bench/fp8_gemm.py, the layer's GEMMs alone), each holding
    {"gpu": "h200", "efficiency": {"bf16" | "fp8": {"decode_roofline_fraction": {"1": 0.6, "16": ...},
                                                     "prefill_gemm_fraction": 0.7}}}
(a file with a top-level block and no "efficiency" counts as "bf16"). Smoke runs and files with no
efficiency block are skipped; a malformed block is an error naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from shard.config import ModelConfig
from shard.gpus import GPU
from shard.layout import Layout, valid_tp
from shard.plan import RankPlan, plan_replica

RESERVE = 0.10
FP8_RESIDENT_NOTE = ("fp8: FP8 weights stay FP8 on the GPU as Caravan's loader keeps them (shard/quant.py: linears "
                     "whose checkpoint parts are all FP8), multiplied by the FP8 GEMMs of shard/kernels/fp8.py")
ROOFLINE_NOTE = "estimates are roofline floors at peak datasheet rates (no measured efficiency for this GPU and dtype)"
ACT_BYTES = 2        # activations travel as BF16
RESULT_GLOBS = ("gpu_layer-*.json", "fp8_gemm-*.json")


class MeasurementError(ValueError):
    """A bench result the planner cannot read; the message names the file and the field."""


@dataclass(frozen=True)
class Measured:
    """Fractions of the roofline a GPU bench measured, for one GPU and weight dtype."""

    gpu: str
    dtype: str
    decode: dict[int, float]            # batch -> fraction of the HBM roofline a decode step reached
    prefill: float | None               # fraction of the tensor-core peak a prefill's GEMMs reached
    source: str                         # the file

    def decode_at(self, batch: int) -> float:
        """The fraction at the measured batch nearest `batch` (by ratio: 12 is nearer 16 than 1)."""
        return self.decode[min(sorted(self.decode), key=lambda b: abs(math.log(max(batch, 1) / b)))]


def load_measured(results: Path | None, gpu: GPU, dtype: str) -> Measured | None:
    """The newest measurement in `results` for `gpu` and `dtype` ("bf16" or "fp8"), whole-layer
    benches before GEMM-only ones; None when there is none (or `results` is None)."""
    if results is None or not results.is_dir():
        return None
    for pattern in RESULT_GLOBS:
        for path in sorted(results.glob(pattern), reverse=True):
            found = _read_measured(path, gpu, dtype)
            if found is not None:
                return found
    return None


def _read_measured(path: Path, gpu: GPU, dtype: str) -> Measured | None:
    def bad(where: str, problem: str) -> MeasurementError:
        return MeasurementError(f"{path}: {where} {problem}; rerun the bench that wrote it, or move the file out "
                                f"of the results folder (caravan plan --results)")

    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise bad("the file", f"is not JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("smoke") or raw.get("gpu") != gpu.name:
        return None
    blocks = raw.get("efficiency")
    if blocks is None and "decode_roofline_fraction" in raw:
        blocks = {"bf16": raw}
    if not isinstance(blocks, dict) or not isinstance(block := blocks.get(dtype), dict):
        return None
    decode = block.get("decode_roofline_fraction")
    if not isinstance(decode, dict) or not decode:
        raise bad(f"efficiency.{dtype}.decode_roofline_fraction", f"is {decode!r}, not a map of batch to fraction")
    fractions = {}
    for batch, f in decode.items():
        if not (str(batch).isdigit() and int(batch) > 0 and isinstance(f, (int, float)) and 0 < f <= 1):
            raise bad(f"efficiency.{dtype}.decode_roofline_fraction[{batch!r}]",
                      f"is {f!r}; want a batch >= 1 and a fraction in (0, 1]")
        fractions[int(batch)] = float(f)
    prefill = block.get("prefill_gemm_fraction")
    if prefill is not None and not (isinstance(prefill, (int, float)) and 0 < prefill <= 1):
        raise bad(f"efficiency.{dtype}.prefill_gemm_fraction", f"is {prefill!r}; want a fraction in (0, 1]")
    return Measured(gpu.name, dtype, fractions, None if prefill is None else float(prefill), str(path))


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    nodes: int
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Workload:
    input_tokens: int = 1024
    output_tokens: int = 128
    context: int = 8192      # the sequence length the "sequences" column and the fit test count
    draft_tokens: int = 0    # speculation: tokens proposed per verify step (0: none)
    acceptance: float = 0.0  # speculation: the chance each proposed token is accepted

    @property
    def tokens_per_verify(self) -> float:
        """Tokens a verify step yields on average: 1 + a + a^2 + ... + a^k."""
        return sum(self.acceptance ** i for i in range(self.draft_tokens + 1))


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    replicas: int
    weight_bytes: int        # per GPU: the largest rank
    over_bytes: int          # per GPU, on the tightest rank: > 0 when the layout does not fit
    kv_tokens: int           # per replica
    sequences: int           # per replica, at `context` tokens
    decode_s: float          # per token, one sequence at `context`
    prefill_s: float         # one prompt of `input` tokens
    batch: int               # sequences per replica at input + output tokens
    requests_per_s: float    # whole cluster
    output_tokens_per_s: float
    measured: Measured | None = None   # the efficiencies applied, or None: roofline floors
    speculative_decode_s: float | None = None  # per token, one sequence at `context`, with the workload's speculation

    @property
    def fits(self) -> bool:
        return self.over_bytes <= 0

    @property
    def gpus(self) -> int:
        return self.layout.world_size * self.replicas


def layouts(cfg: ModelConfig, cluster: Cluster) -> list[tuple[Layout, int]]:
    """(layout, replicas) for every layout the module's rules allow."""
    out = []
    for tp in (t for t in valid_tp(cfg) if cluster.gpus_per_node % t == 0):
        for pp in range(1, min(cfg.num_layers, cluster.gpus // tp) + 1):
            if cluster.gpus % (tp * pp) == 0:
                out.append((Layout(tp, pp), cluster.gpus // (tp * pp)))
    return out


def rank_layouts(cfg: ModelConfig, cluster: Cluster, workload: Workload, only: Layout | None = None,
                 measured: Measured | None = None) -> list[Estimate]:
    """Every layout's estimate, best first; those that do not fit last, the nearest to fitting first.
    FP8 weights where `cfg.quantization` says (`shard.plan.as_fp8`). `only`: a TP or PP of 0 there means any.
    `measured`: efficiencies to apply (`load_measured`), else roofline floors."""
    chosen = [(lay, r) for lay, r in layouts(cfg, cluster)
              if only is None or ((only.tp in (0, lay.tp)) and (only.pp in (0, lay.pp)))]
    estimates = [estimate(cfg, cluster, lay, r, workload, measured) for lay, r in chosen]
    # Over-budget layouts compare by the GB they miss by, so a near-tie goes to the faster one.
    return sorted(estimates, key=lambda e: (not e.fits, -e.output_tokens_per_s, round(e.over_bytes / 1e7),
                                            e.decode_s))


def estimate(cfg: ModelConfig, cluster: Cluster, layout: Layout, replicas: int, workload: Workload,
             measured: Measured | None = None) -> Estimate:
    g, w = cluster.gpu, workload
    if measured is not None and measured.gpu != g.name:
        raise ValueError(f"efficiencies measured on {measured.gpu} ({measured.source}) applied to {g.name}")
    plans = plan_replica(cfg, layout, None, torch.bfloat16)
    # Each stage's fullest rank (check_layout makes TP splits even, so any of them).
    stages = [max((p for p in plans if p.pp_rank == s), key=lambda p: p.weight_bytes) for s in range(layout.pp)]
    usable = int(g.memory_bytes * (1 - RESERVE))
    kv_tokens = max(0, min((usable - p.weight_bytes) // p.kv_bytes_per_token for p in stages))
    over = max(p.weight_bytes + w.context * p.kv_bytes_per_token - usable for p in stages)
    hops = _network_hops(cluster, layout, replicas)

    def stage_s(p: RankPlan, batch: int, context: float, rows: int = 1) -> float:
        """`batch` sequences at `context` tokens, each with `rows` new tokens (1, or 1 + k to verify)."""
        read = (p.weight_bytes + batch * context * p.kv_bytes_per_token) / g.hbm_bytes_per_s
        reduces = 2 * len(p.layers) * _all_reduce_s(g, layout.tp, batch * rows * cfg.hidden_size)
        efficiency = measured.decode_at(batch * rows) if measured else 1.0
        return max(read, batch * rows * _flop_s(g, p)) / efficiency + reduces

    def hand_offs_s(batch: int) -> float:
        size = ACT_BYTES * batch * cfg.hidden_size
        return hops * size / g.internode_bytes_per_s + (layout.pp - 1 - hops) * size / g.nvlink_bytes_per_s

    decode = sum(stage_s(p, 1, w.context) for p in stages) + hand_offs_s(1)
    speculative = None
    if w.draft_tokens:
        rows = 1 + w.draft_tokens
        speculative = (sum(stage_s(p, 1, w.context, rows) for p in stages) + hand_offs_s(rows)) / w.tokens_per_verify
    prefill_efficiency = measured.prefill if measured and measured.prefill else 1.0
    prefill_stages = [max(w.input_tokens * _flop_s(g, p) / prefill_efficiency, p.weight_bytes / g.hbm_bytes_per_s)
                      + 2 * len(p.layers) * _all_reduce_s(g, layout.tp, w.input_tokens * cfg.hidden_size)
                      for p in stages]
    prefill = sum(prefill_stages) + hand_offs_s(w.input_tokens)

    batch = kv_tokens // (w.input_tokens + w.output_tokens)
    rate = 0.0
    if over <= 0 and batch > 0:
        micro = max(1, batch // layout.pp)
        running = min(batch, micro * layout.pp)
        context = w.input_tokens + w.output_tokens / 2
        # A sequence waits a whole cycle between its tokens: every stage runs every micro-batch once.
        cycle = max(layout.pp * max(stage_s(p, micro, context) for p in stages),
                    sum(stage_s(p, micro, context) for p in stages) + hand_offs_s(micro))
        per_request = max(prefill_stages) + w.output_tokens * cycle / running
        rate = replicas / per_request
    return Estimate(layout, replicas, max(p.weight_bytes for p in plans), over, kv_tokens,
                    kv_tokens // w.context, decode, prefill, batch, rate, rate * w.output_tokens, measured, speculative)


def _flop_s(g: GPU, p: RankPlan) -> float:
    """Seconds of one token through this rank's weights: 2 FLOPs a parameter, FP8 ones at the FP8 rate."""
    return 2 * ((p.params - p.fp8_params) / g.bf16_flops + p.fp8_params / (g.fp8_flops or g.bf16_flops))


def _all_reduce_s(g: GPU, tp: int, elements: int) -> float:
    """A ring all-reduce: each rank sends 2(n-1)/n of the tensor over its NVLink."""
    return 2 * (tp - 1) / tp * ACT_BYTES * elements / g.nvlink_bytes_per_s


def _network_hops(cluster: Cluster, layout: Layout, replicas: int) -> int:
    """Stage hand-offs that cross nodes, in the replica with the most, GPUs filled in rank order."""
    def crossing(first: int) -> int:
        return sum((first + s * layout.tp) // cluster.gpus_per_node != (first + (s - 1) * layout.tp)
                   // cluster.gpus_per_node for s in range(1, layout.pp))
    return max(crossing(r * layout.world_size) for r in range(replicas))


def format_ranking(cfg: ModelConfig, cluster: Cluster, workload: Workload, estimates: list[Estimate]) -> str:
    g, w = cluster.gpu, workload
    lines = [f"{cfg.name} on {cluster.nodes} x {cluster.gpus_per_node} {g.name} ({g.memory_bytes / 1e9:.1f} GB, "
             f"{RESERVE:.0%} reserved), {'fp8 + bf16' if cfg.quantization else 'bf16'} weights, bf16 KV cache; "
             f"workload {w.input_tokens}:{w.output_tokens} tokens, context {w.context}",
             f"{'#':>2}  {'layout':<19} {'weights GB':>10} {'KV tokens':>10} {'seqs':>6} {'decode ms':>9} "
             + (f"{'spec ms':>8} " if w.draft_tokens else "")
             + f"{'prefill ms':>10} {'batch':>6} {'req/s':>7} {'out tok/s':>9} {'/GPU':>6}"]
    for i, e in enumerate(estimates, 1):
        name = f"{e.layout} x {e.replicas}"
        head = f"{i:>2}  {name:<19} {e.weight_bytes / 1e9:>10.2f} "
        if e.fits:
            spec = f"{e.speculative_decode_s * 1e3:>8.1f} " if e.speculative_decode_s is not None else ""
            lines.append(head + f"{e.kv_tokens:>10,} {e.sequences:>6,} {e.decode_s * 1e3:>9.1f} {spec}"
                                f"{e.prefill_s * 1e3:>10.0f} {e.batch:>6,} {e.requests_per_s:>7.2f} "
                                f"{e.output_tokens_per_s:>9,.0f} {e.output_tokens_per_s / e.gpus:>6.1f}")
        else:
            lines.append(head + f"does not fit: {e.over_bytes / 1e9:.2f} GB over per GPU")
    if not estimates:
        lines.append("no layout: no TP that the model allows divides the GPUs of a node")
    elif not estimates[0].fits:
        e = estimates[0]
        fp8_hint = "" if cfg.quantization else ", or --dtype fp8"
        lines.append(f"no layout fits: the nearest, {e.layout} x {e.replicas}, needs {e.over_bytes / 1e9:.2f} GB "
                     f"more per GPU; add nodes or take a GPU with more memory{fp8_hint}")
    lines.append(f"weights: largest rank; KV tokens, seqs (at {w.context} tokens) and batch (at "
                 f"{w.input_tokens + w.output_tokens}): per replica; decode: ms per token of one sequence; "
                 f"req/s and out tok/s: whole cluster (ranked by); the model: shard/planner.py")
    if w.draft_tokens:
        lines.append(f"spec: decode ms per token of one sequence with speculation, {w.draft_tokens} draft tokens a "
                     f"verify step accepted at {w.acceptance:.0%} each: {w.tokens_per_verify:.2f} tokens a step "
                     "(a draft model's own time not counted)")
    lines.append(measured_note(estimates[0].measured if estimates else None))
    if cfg.quantization:
        lines.append(FP8_RESIDENT_NOTE)
    return "\n".join(lines)


def measured_note(m: Measured | None) -> str:
    if m is None:
        return ROOFLINE_NOTE
    decode = ", ".join(f"batch {b}: {m.decode[b]:.0%}" for b in sorted(m.decode))
    prefill = f"; prefill at {m.prefill:.0%} of the GEMM peak" if m.prefill else ""
    return f"measured on {m.gpu}, {m.source} ({m.dtype}): decode at {decode} of the HBM roofline{prefill}"


def ranking_json(cfg: ModelConfig, cluster: Cluster, workload: Workload, estimates: list[Estimate]) -> dict:
    return {
        "model": cfg.name, "gpu": cluster.gpu.name, "nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node,
        "dtype": "fp8" if cfg.quantization else "bf16", "reserve_fraction": RESERVE,
        "workload": {"input_tokens": workload.input_tokens, "output_tokens": workload.output_tokens,
                     "context": workload.context, "draft_tokens": workload.draft_tokens,
                     "acceptance": workload.acceptance},
        "ranked_by": "output_tokens_per_s",
        "estimate": _measured_json(estimates[0].measured if estimates else None),
        "layouts": [{
            "tp": e.layout.tp, "pp": e.layout.pp, "replicas": e.replicas, "gpus": e.gpus, "fits": e.fits,
            "weight_bytes_per_gpu": e.weight_bytes, "over_bytes_per_gpu": max(0, e.over_bytes),
            "kv_tokens_per_replica": e.kv_tokens, "sequences_per_replica": e.sequences,
            "decode_s_per_token": e.decode_s, "speculative_decode_s_per_token": e.speculative_decode_s,
            "prefill_s": e.prefill_s, "batch_per_replica": e.batch,
            "requests_per_s": e.requests_per_s, "output_tokens_per_s": e.output_tokens_per_s,
        } for e in estimates],
    }


def _measured_json(m: Measured | None) -> dict:
    if m is None:
        return {"basis": "roofline", "note": ROOFLINE_NOTE}
    return {"basis": "measured", "gpu": m.gpu, "dtype": m.dtype, "source": m.source, "note": measured_note(m),
            "decode_roofline_fraction": {str(b): m.decode[b] for b in sorted(m.decode)}, "prefill_gemm_fraction": m.prefill}
