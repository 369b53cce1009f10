"""`caravan plan`: what each rank of a layout holds and reads, or every layout of a GPU cluster ranked by
estimated throughput (`shard.plan`, `shard.planner`); no weights needed."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from cluster.cli.args import model_dir as checkpoint_dir
from cluster.config import DTYPES, ConfigError
from shard.config import ModelConfig
from shard.gpus import GPUS, gpu
from shard.layout import Layout
from shard.loader import Checkpoint
from shard.plan import as_fp8, format_plan, plan_replica
from shard.planner import (Cluster, MeasurementError, Workload, format_ranking, load_measured, rank_layouts,
                           ranking_json)

REPO = Path(__file__).resolve().parents[2]


def add_parser(sub) -> None:
    plan = sub.add_parser("plan", help="show what each rank of a TP x PP layout holds and reads, or with --gpu rank "
                                       "every layout of a cluster by estimated throughput (no weights needed)",
                          description="Without --gpu: what each rank of one TP x PP layout holds. With --gpu: every "
                                      "TP x PP x replicas layout of --nodes x --gpus-per-node GPUs (TP dividing a "
                                      "node's GPUs, TP x PP dividing the cluster), with weights and KV cache per GPU, "
                                      "decode and prefill floors and a throughput ceiling, best first; the model "
                                      "behind the numbers is in shard/planner.py. Exit 0: a layout fits (or "
                                      "without --gpu); 1: none fits; 2: a bad flag.")
    plan.add_argument("--model", type=Path, default=None,
                      help="Hugging Face checkpoint folder, or with --gpu its config.json alone (default: the demo "
                           "model, SmolLM2-135M-Instruct)")
    plan.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default 1; with --gpu: any)")
    plan.add_argument("--pp", type=int, default=None, help="pipeline-parallel degree (default 1; with --gpu: any)")
    plan.add_argument("--dtype", choices=sorted([*DTYPES, "bf16", "fp8"]), default=None,
                      help="weights: fp8 counts those the checkpoint's quantization_config, or else Meta's Llama "
                           "3.1 FP8 recipe, keeps FP8 (1 byte and a float32 scale a row), the rest bfloat16 (default: "
                           "fp8 for an FP8 checkpoint, else bfloat16)")
    plan.add_argument("--files", action="store_true", help="list the checkpoint files each rank opens")
    plan.add_argument("--gpu", default=None, help="rank the layouts of a cluster of these GPUs: "
                                                  + ", ".join(sorted(GPUS)))
    plan.add_argument("--nodes", type=int, default=None, help="with --gpu: nodes (default 1)")
    plan.add_argument("--gpus-per-node", type=int, default=None, help="with --gpu: GPUs per node (default 8)")
    plan.add_argument("--context", type=int, default=None,
                      help="with --gpu: tokens of one sequence a layout must hold to fit, and count by (default 8192)")
    plan.add_argument("--workload", default=None, metavar="IN:OUT",
                      help="with --gpu: input and output tokens of a request, for the throughput (default 1024:128)")
    plan.add_argument("--speculate", default=None, metavar="K:RATE",
                      help="with --gpu: also the decode floor with speculative decoding, K draft tokens a verify "
                           "step, each accepted with probability RATE, e.g. 4:0.7 (the replica metric "
                           "caravan_speculative_acceptance_ratio measures it)")
    plan.add_argument("--json", action="store_true", help="with --gpu: print the ranking as one JSON object")
    plan.add_argument("--results", type=Path, default=None,
                      help="with --gpu: the folder of GPU bench results whose measured efficiencies the estimate "
                           "uses for that GPU (bench/gpu_layer.py, bench/fp8_gemm.py; default: this checkout's "
                           "bench/results); without any, the estimate is the roofline floor")
    plan.set_defaults(run=run)



def run(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        return _rank_layouts(args)
    for flag in ("nodes", "gpus_per_node", "context", "workload", "speculate", "json", "results"):
        if getattr(args, flag) not in (None, False):
            raise ConfigError("--" + flag.replace("_", "-"), "needs --gpu (the cluster whose layouts to rank)",
                                   "command line")
    model_dir = checkpoint_dir(args)
    cfg = _plan_weights(ModelConfig.from_pretrained(model_dir), args.dtype)
    layout = Layout(args.tp or 1, args.pp or 1)
    dtype = DTYPES.get(args.dtype, torch.bfloat16)
    plans = plan_replica(cfg, layout, Checkpoint.open(model_dir), dtype)
    print(format_plan(cfg, layout, plans, dtype))
    if args.files:
        for p in plans:
            print(f"rank {p.rank}: {' '.join(p.files)}")
    return 0


def _rank_layouts(args: argparse.Namespace) -> int:
    def bad(flag: str, problem: str) -> ConfigError:
        return ConfigError(flag, problem, "command line")

    try:
        spec = gpu(args.gpu)
    except KeyError as e:
        raise bad("--gpu", e.args[0]) from None
    nodes = 1 if args.nodes is None else args.nodes
    per_node = 8 if args.gpus_per_node is None else args.gpus_per_node
    context = 8192 if args.context is None else args.context
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", per_node), ("--context", context),
                        ("--tp", args.tp), ("--pp", args.pp)):
        if value is not None and value < 1:
            raise bad(flag, f"got {value}; use a whole number >= 1")
    if args.files:
        raise bad("--files", "lists one layout's files; drop --gpu, or --files")
    if args.dtype not in (None, "bf16", "bfloat16", "fp8"):
        raise bad("--dtype", f"{args.dtype} is not a serving dtype here; use bf16 or fp8")
    text = args.workload or "1024:128"
    parts = text.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise bad("--workload", f"got {text!r}; use INPUT:OUTPUT tokens of a request, both >= 1, e.g. 1024:128")
    draft_tokens, acceptance = _speculation(args.speculate, bad)
    workload = Workload(int(parts[0]), int(parts[1]), context, draft_tokens, acceptance)

    model = args.model if args.model is not None else checkpoint_dir(args)
    cfg = _plan_weights(ModelConfig.from_pretrained(model), args.dtype)
    cluster = Cluster(spec, nodes, per_node)
    results = args.results if args.results is not None else REPO / "bench" / "results"
    if args.results is not None and not results.is_dir():
        raise bad("--results", f"{results} is not a folder; point it at the bench results (bench/results)")
    try:
        measured = load_measured(results, spec, "fp8" if cfg.quantization else "bf16")
    except MeasurementError as e:
        raise bad("--results", str(e)) from None
    ranked = rank_layouts(cfg, cluster, workload, only=Layout(args.tp or 0, args.pp or 0), measured=measured)
    if args.json:
        print(json.dumps(ranking_json(cfg, cluster, workload, ranked), indent=2))
    else:
        print(format_ranking(cfg, cluster, workload, ranked))
    return 0 if any(e.fits for e in ranked) else 1


def _speculation(text: str | None, bad) -> tuple[int, float]:
    """--speculate K:RATE as (draft tokens, acceptance rate); (0, 0.0) without it."""
    if text is None:
        return 0, 0.0
    k, _, rate = text.partition(":")
    try:
        draft_tokens, acceptance = int(k), float(rate)
    except ValueError:
        draft_tokens, acceptance = 0, -1.0
    if not 1 <= draft_tokens <= 16 or not 0 <= acceptance <= 1:
        raise bad("--speculate", f"got {text!r}; use K:RATE, K draft tokens a step (1 to 16) and RATE the chance "
                                 "each is accepted (0 to 1), e.g. 4:0.7")
    return draft_tokens, acceptance


def _plan_weights(cfg, dtype: str | None):
    """The config whose `quantization` says which weights `plan` counts as FP8: --dtype fp8 makes them
    FP8 (`as_fp8`), another --dtype makes them all that dtype (what the loader's dequantisation gives)."""
    if dtype == "fp8":
        return as_fp8(cfg)
    return cfg if dtype is None else dataclasses.replace(cfg, quantization=None)
