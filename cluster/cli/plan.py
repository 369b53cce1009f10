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
from shard.gpus import gpu
from shard.layout import Layout
from shard.loader import Checkpoint
from shard.plan import as_fp8, format_plan, plan_replica
from shard.planner import (Cluster, MeasurementError, Workload, format_ranking, load_measured, rank_layouts,
                           ranking_json)

REPO = Path(__file__).resolve().parents[2]



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
    dtype = getattr(torch, args.dtype) if args.dtype in DTYPES else torch.bfloat16   # bf16, fp8 (its other weights) or none
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
