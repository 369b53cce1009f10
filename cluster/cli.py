"""`caravan`: the command line. Subcommands: generate (offline, local processes), serve, plan, doctor (a
Ray cluster's links before it serves), and the clients of a running router: chat, complete, status,
scale, drain (their gRPC side is cluster/client.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cluster.app import AppError
from cluster.config import ConfigError as ServeConfigError
from cluster.offline import RequestError
from cluster.placement import PlacementError
from cluster.tokenizer import TokenizerError
from shard.config import ConfigError
from shard.demo import DemoModelError
from shard.layout import Layout, LayoutError
from shard.loader import CheckpointError
from shard.sampler import SamplingError, SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
USER_ERRORS = (ConfigError, LayoutError, CheckpointError, SamplingError, RequestError, TokenizerError, DemoModelError,
               FileNotFoundError, ServeConfigError, PlacementError, AppError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caravan", description="Serve one huge Llama across many GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline from a model sharded TP x PP over local processes")
    gen.add_argument("prompt", help="the user message (chat template applied) or, with --raw, the prompt text")
    _model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(run=_generate)

    srv = sub.add_parser("serve", help="bring up the model's replicas on a Ray cluster, from one YAML config")
    srv.add_argument("config", nargs="?", type=Path, default=None,
                     help="cluster config YAML (default: SmolLM2, TP 3 x PP 2, on a local Ray cluster simulating "
                          "2 nodes); every key is listed in cluster/config.py")
    srv.add_argument("--address", default=None, help="join this Ray cluster (auto, or HOST:PORT) instead of the "
                                                     "config's address or a local one")
    srv.add_argument("--port", type=int, default=None, help="the router's gRPC port (default: router.port, 50051)")
    srv.add_argument("--once", metavar="PROMPT", default=None,
                     help="answer this chat prompt through the router's gRPC API, then drain and exit (a smoke test)")
    srv.add_argument("--max-tokens", type=int, default=64, help="with --once: tokens to generate at most")
    srv.add_argument("--print-serve-config", action="store_true",
                     help="print the Ray Serve config (YAML) of this application, for `serve deploy` or the "
                          "dashboard's REST API (PUT /api/serve/applications/), and exit")
    srv.set_defaults(run=_serve)

    from shard.gpus import GPUS

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
    plan.add_argument("--json", action="store_true", help="with --gpu: print the ranking as one JSON object")
    plan.add_argument("--results", type=Path, default=None,
                      help="with --gpu: the folder of GPU bench results whose measured efficiencies the estimate "
                           "uses for that GPU (bench/gpu_layer.py, bench/fp8_gemm.py; default: this checkout's "
                           "bench/results); without any, the estimate is the roofline floor")
    plan.set_defaults(run=_plan)

    chat = sub.add_parser("chat", help="talk with the model served by a running router (one line, one turn)",
                          description="Reads user turns from stdin, one per line, and streams each reply. The "
                                      "whole conversation is sent with each turn. /reset forgets it, /exit or "
                                      "end of input ends the chat.")
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system message opening the conversation")
    _sampling_args(chat)
    _router_args(chat)
    chat.set_defaults(run=_chat)

    comp = sub.add_parser("complete", help="stream the model's completion of one prompt from a running router")
    comp.add_argument("prompt", help="the prompt text, sent as is (no chat template) unless --chat")
    comp.add_argument("--chat", action="store_true", help="send the prompt as one user message (chat template "
                                                          "applied by the router)")
    comp.add_argument("--json", action="store_true", help="print one JSON object at the end (text, token ids, "
                                                          "finish reason, usage) instead of streaming text")
    comp.add_argument("--logprobs", action="store_true", help="with --json: also each token's log-probability")
    _sampling_args(comp)
    _router_args(comp)
    comp.set_defaults(run=_complete)

    stat = sub.add_parser("status", help="a running router's state: queue, replicas, their shards")
    stat.add_argument("--json", action="store_true", help="print the Admin.Status answer as JSON")
    _router_args(stat)
    stat.set_defaults(run=_status)

    scale = sub.add_parser("scale", help="set the number of replicas of a running router")
    scale.add_argument("replicas", type=_int32, help="replicas wanted, >= 1")
    _router_args(scale)
    scale.set_defaults(run=_scale)

    drain = sub.add_parser("drain", help="stop a running router gracefully: refuse new requests, finish the rest")
    drain.add_argument("--grace", type=float, default=0.0,
                       help="seconds in-flight requests get before they are cut off (default: router.drain_grace_s)")
    _router_args(drain)
    drain.set_defaults(run=_drain)

    doc = sub.add_parser("doctor", help="check a Ray cluster before it serves: capacity, every TP and PP link "
                                        "(hangs, latency, bandwidth), the NCCL environment of every node",
                         description="Places probe actors exactly as one replica's shards, joins their process "
                                     "groups, and probes each TP all-reduce and PP hand-off within --timeout. "
                                     "Exit 0: every check passed; 1: a check failed; 2: a bad config.")
    doc.add_argument("config", nargs="?", type=Path, default=None,
                     help="cluster config YAML, as for `caravan serve` (default: SmolLM2, TP 3 x PP 2, on a local "
                          "Ray cluster simulating 2 nodes)")
    doc.add_argument("--address", default=None, help="join this Ray cluster (auto, or HOST:PORT) instead of the "
                                                     "config's address or a local one; auto inside a Ray job")
    doc.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                     help="deadline of each link's check: warm-up (NCCL's communicator set-up on GPUs), latency "
                          "and bandwidth runs together; a link past it is reported as hung (default 30)")
    doc.add_argument("--small-bytes", default="4KiB", metavar="SIZE",
                     help="message that measures latency (default 4KiB)")
    doc.add_argument("--large-bytes", default=None, metavar="SIZE",
                     help="message that measures bandwidth (default: 256MiB on CUDA, 4MiB on CPU)")
    doc.add_argument("--json", action="store_true", help="print the report as one JSON object")
    doc.set_defaults(run=_doctor)

    args = parser.parse_args(argv)
    if args.command == "complete" and args.logprobs and not args.json:
        comp.error("--logprobs needs --json (streamed text has nowhere to put them)")
    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"caravan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _model_args(p: argparse.ArgumentParser, dtype_default: str = "float32") -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face checkpoint folder (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: ranks per stage (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree: stages (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=dtype_default, help=f"default {dtype_default}")


def _router_args(p: argparse.ArgumentParser) -> None:
    from cluster.client import DEFAULT_SERVER, UNARY_TIMEOUT_S

    p.add_argument("--server", default=DEFAULT_SERVER, metavar="HOST:PORT",
                   help=f"the router's gRPC address (default {DEFAULT_SERVER})")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help=f"deadline of each call (default {UNARY_TIMEOUT_S:g} s for status and scale, none for "
                        "streamed generation)")
    p.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                   help="file holding the router's bearer token (default: $CARAVAN_AUTH_TOKEN, else "
                        "~/.caravan/auth_token if it exists, else no token)")
    p.add_argument("--tls-ca", type=Path, default=None, metavar="PATH",
                   help="PEM bundle of the CA that signed the router's certificate; connects with TLS "
                        "(default: plaintext)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=_int32, default=None, help="tokens to generate at most (default: the "
                                                                   "router's, 256 or what the context leaves)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="softmax temperature; 0 is greedy. Default 0 here, so answers are reproducible (the "
                        "router's own default is 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: 1.0)")
    p.add_argument("--top-k", type=_int32, default=None, help="sample from the k likeliest tokens (default: all)")
    p.add_argument("--seed", type=_uint64, default=None, help="seed for reproducible sampling (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the text contains this (not included); repeatable")


def _int32(text: str) -> int:
    value = int(text)
    if not -2**31 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{text} does not fit in 32 bits")
    return value


def _uint64(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 2**64)")
    return value


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model is not None:
        if not args.model.is_dir():
            raise FileNotFoundError(f"--model {args.model} is not a folder; give a Hugging Face checkpoint folder")
        return args.model
    from shard.demo import ensure_demo_model
    return ensure_demo_model()


def _generate(args: argparse.Namespace) -> int:
    from cluster.local import LocalReplica
    from cluster.offline import Request, blocks_needed, check_requests, generate
    from cluster.tokenizer import IncrementalDetokenizer, Tokenizer
    from shard.config import ModelConfig
    from shard.layout import check_layout
    from shard.loader import Checkpoint

    model_dir = _model_dir(args)
    cfg = ModelConfig.from_pretrained(model_dir)
    layout = Layout(args.tp, args.pp)
    check_layout(cfg, layout)
    # Headers only, and before the tokenizer: a broken checkpoint is the first thing to report.
    Checkpoint.open(model_dir).validate(cfg)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            max_tokens=args.max_tokens, logprobs=0 if args.json else None)
    tok = Tokenizer.from_pretrained(model_dir)
    prompt_ids = (tok.encode(args.prompt) if args.raw
                  else tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    requests = [Request(prompt_ids, params)]
    check_requests(requests, cfg.max_position_embeddings, cfg.vocab_size)

    block_size = 16
    start = time.perf_counter()
    with LocalReplica(model_dir, layout, dtype=DTYPES[args.dtype], num_blocks=blocks_needed(requests, block_size),
                      block_size=block_size, progress=not args.json) as replica:
        loaded = time.perf_counter()
        detok = IncrementalDetokenizer(tok)
        ids, logprobs, finish = [], [], None
        for ev in generate(replica, requests, tok.eos_token_ids):
            ids.append(ev.token_id)
            logprobs.append(ev.logprob)
            finish = ev.finish_reason
            delta = detok.push(ev.token_id)
            if not args.json:
                print(delta, end="", flush=True)
        tail = detok.flush()
        done = time.perf_counter()
    rate = len(ids) / (done - loaded)
    if args.json:
        print(json.dumps({
            "model": str(model_dir), "tp": layout.tp, "pp": layout.pp, "dtype": args.dtype,
            "prompt_token_ids": prompt_ids, "token_ids": ids, "text": detok.text + tail,
            "logprobs": logprobs, "finish_reason": finish,
            "load_seconds": round(loaded - start, 2), "tokens_per_second": round(rate, 2),
        }))
    else:
        print(tail)
        print(f"[{len(ids)} tokens, {finish}, {rate:.1f} tokens/s, {layout}, load {loaded - start:.1f} s]",
              file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    from cluster.config import ServeConfig
    from cluster.launch import model_dir_for, serve_attached

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    source = str(args.config) if args.config else "<default config>"
    config = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    if args.address:
        config = dataclasses.replace(config, address=args.address)
    if args.port is not None:
        config = dataclasses.replace(config, router=dataclasses.replace(config.router, port=args.port))
    if args.print_serve_config:
        import yaml

        from cluster.app import serve_config
        config.check_model_path(source)
        print(yaml.safe_dump(serve_config(config), sort_keys=False), end="")
        return 0
    model_dir_for(config, source)  # the config against the model and its checkpoint, before Ray starts
    return serve_attached(config, once=args.once, max_tokens=args.max_tokens)


def _options(args: argparse.Namespace):
    from cluster.client import Options

    return Options(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, stop=tuple(args.stop), logprobs=getattr(args, "logprobs", False))


def _connect(args: argparse.Namespace, body) -> int:
    from cluster.client import run

    return run(args.command, args.server, body, token_file=args.token_file, tls_ca=args.tls_ca,
               timeout=args.timeout, err=sys.stderr)


def _chat(args: argparse.Namespace) -> int:
    from cluster.client import chat

    return _connect(args, lambda router: chat(router, _options(args), system=args.system, stdin=sys.stdin,
                                              out=sys.stdout, err=sys.stderr))


def _complete(args: argparse.Namespace) -> int:
    from cluster.client import complete

    return _connect(args, lambda router: complete(router, args.prompt, _options(args), as_chat=args.chat,
                                                  as_json=args.json, out=sys.stdout, err=sys.stderr))


def _status(args: argparse.Namespace) -> int:
    from cluster.client import status

    return _connect(args, lambda router: status(router, as_json=args.json, out=sys.stdout))


def _scale(args: argparse.Namespace) -> int:
    from cluster.client import scale

    return _connect(args, lambda router: scale(router, args.replicas, out=sys.stdout))


def _drain(args: argparse.Namespace) -> int:
    from cluster.client import drain

    return _connect(args, lambda router: drain(router, args.grace, out=sys.stdout))


def _doctor(args: argparse.Namespace) -> int:
    import dataclasses

    from cluster.config import ServeConfig
    from cluster.diagnosis import format_report, parse_size
    from cluster.doctor import Options, diagnose

    config = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    if args.address:
        config = dataclasses.replace(config, address=args.address)
    if not args.timeout > 0:
        raise ServeConfigError("--timeout", f"got {args.timeout:g}; use a number of seconds > 0", "command line")
    options = Options(args.timeout, parse_size("--small-bytes", args.small_bytes),
                      args.large_bytes and parse_size("--large-bytes", args.large_bytes))
    report = diagnose(config, options, log=lambda line: print(f"doctor: {line}", file=sys.stderr, flush=True))
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return report.exit_code


def _plan(args: argparse.Namespace) -> int:
    from shard.config import ModelConfig
    from shard.loader import Checkpoint
    from shard.plan import format_plan, plan_replica

    if args.gpu is not None:
        return _rank_layouts(args)
    for flag in ("nodes", "gpus_per_node", "context", "workload", "json", "results"):
        if getattr(args, flag) not in (None, False):
            raise ServeConfigError("--" + flag.replace("_", "-"), "needs --gpu (the cluster whose layouts to rank)",
                                   "command line")
    model_dir = _model_dir(args)
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
    from shard.config import ModelConfig
    from shard.gpus import gpu
    from shard.planner import (Cluster, MeasurementError, Workload, format_ranking, load_measured, rank_layouts,
                               ranking_json)

    def bad(flag: str, problem: str) -> ServeConfigError:
        return ServeConfigError(flag, problem, "command line")

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
    workload = Workload(int(parts[0]), int(parts[1]), context)

    model = args.model if args.model is not None else _model_dir(args)
    cfg = _plan_weights(ModelConfig.from_pretrained(model), args.dtype)
    cluster = Cluster(spec, nodes, per_node)
    results = args.results if args.results is not None else Path(__file__).resolve().parents[1] / "bench" / "results"
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


def _plan_weights(cfg, dtype: str | None):
    """The config whose `quantization` says which weights `plan` counts as FP8: --dtype fp8 makes them
    FP8 (`as_fp8`), another --dtype makes them all that dtype (what the loader's dequantisation gives)."""
    import dataclasses

    from shard.plan import as_fp8

    if dtype == "fp8":
        return as_fp8(cfg)
    return cfg if dtype is None else dataclasses.replace(cfg, quantization=None)

if __name__ == "__main__":
    sys.exit(main())
