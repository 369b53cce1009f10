"""Every command's arguments, apart from the commands: argparse and constants only, so that `caravan
--help`, a bad flag or a client command answers without importing torch, Ray or transformers. Each
parser names its command's entry point as "module:function" in `cluster.cli`, imported only when
that command runs (`cluster.cli.main`)."""

from __future__ import annotations

from pathlib import Path

from cluster.cli.args import cluster_args, int32, model_args, router_args, sampling_args
from cluster.config import DTYPES
from shard.gpus import GPUS

COMMANDS = ("generate", "serve", "plan", "remote_commands", "doctor")   # the functions below, in --help's order


def generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate text offline from a model sharded TP x PP over local processes")
    gen.add_argument("prompt", help="the user message (chat template applied) or, with --raw, the prompt text")
    model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(run="generate:run")


def serve(sub) -> None:
    srv = sub.add_parser("serve", help="bring up the model's replicas on a Ray cluster, from one YAML config")
    cluster_args(srv)
    srv.add_argument("--port", type=int, default=None, help="the router's gRPC port (default: router.port, 50051)")
    srv.add_argument("--http-port", type=int, default=None,
                     help="the OpenAI-compatible HTTP API's port; 0 turns it off (default: router.http_port, 8000)")
    srv.add_argument("--once", metavar="PROMPT", default=None,
                     help="answer this chat prompt through the router's gRPC API, then drain and exit (a smoke test)")
    srv.add_argument("--max-tokens", type=int, default=64, help="with --once: tokens to generate at most")
    srv.add_argument("--print-serve-config", action="store_true",
                     help="print the Ray Serve config (YAML) of this application, for `serve deploy` or the "
                          "dashboard's REST API (PUT /api/serve/applications/), and exit")
    srv.set_defaults(run="serve:run")


def plan(sub) -> None:
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
    plan.set_defaults(run="plan:run")


def remote_commands(sub) -> None:
    chat = sub.add_parser("chat", help="talk with the model served by a running router (one line, one turn)",
                          description="Reads user turns from stdin, one per line, and streams each reply. The "
                                      "whole conversation is sent with each turn. /reset forgets it, /exit or "
                                      "end of input ends the chat.")
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system message opening the conversation")
    sampling_args(chat)
    router_args(chat)
    chat.set_defaults(run="remote:chat")

    comp = sub.add_parser("complete", help="stream the model's completion of one prompt from a running router")
    comp.add_argument("prompt", help="the prompt text, sent as is (no chat template) unless --chat")
    comp.add_argument("--chat", action="store_true", help="send the prompt as one user message (chat template "
                                                          "applied by the router)")
    comp.add_argument("--json", action="store_true", help="print one JSON object at the end (text, token ids, "
                                                          "finish reason, usage) instead of streaming text")
    comp.add_argument("--logprobs", action="store_true", help="with --json: also each token's log-probability")
    sampling_args(comp)
    router_args(comp)
    comp.set_defaults(run="remote:complete", parser=comp)

    stat = sub.add_parser("status", help="a running router's state: queue, replicas, their shards")
    stat.add_argument("--json", action="store_true", help="print the Admin.Status answer as JSON")
    router_args(stat)
    stat.set_defaults(run="remote:status")

    scale = sub.add_parser("scale", help="set the number of replicas of a running router")
    scale.add_argument("replicas", type=int32, help="replicas wanted, >= 1")
    router_args(scale)
    scale.set_defaults(run="remote:scale")

    drain = sub.add_parser("drain", help="stop a running router gracefully: refuse new requests, finish the rest")
    drain.add_argument("--grace", type=float, default=0.0,
                       help="seconds in-flight requests get before they are cut off (default: router.drain_grace_s)")
    router_args(drain)
    drain.set_defaults(run="remote:drain")


def doctor(sub) -> None:
    doc = sub.add_parser("doctor", help="check a Ray cluster before it serves: capacity, every TP and PP link "
                                        "(hangs, latency, bandwidth), the NCCL environment of every node",
                         description="Places probe actors exactly as one replica's shards, joins their process "
                                     "groups, and probes each TP all-reduce and PP hand-off within --timeout. "
                                     "Exit 0: every check passed; 1: a check failed; 2: a bad config.")
    cluster_args(doc)
    doc.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                     help="deadline of each link's check: warm-up (NCCL's communicator set-up on GPUs), latency "
                          "and bandwidth runs together; a link past it is reported as hung (default 30)")
    doc.add_argument("--small-bytes", default="4KiB", metavar="SIZE",
                     help="message that measures latency (default 4KiB)")
    doc.add_argument("--large-bytes", default=None, metavar="SIZE",
                     help="message that measures bandwidth (default: 256MiB on CUDA, 4MiB on CPU)")
    doc.add_argument("--json", action="store_true", help="print the report as one JSON object")
    doc.set_defaults(run="doctor:run")
