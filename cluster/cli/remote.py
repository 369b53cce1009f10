"""The commands that talk to a running router over gRPC: chat, complete, status, scale, drain (their gRPC
side is `cluster.cli.client`)."""

from __future__ import annotations

import argparse
import sys

from cluster.cli import client
from cluster.cli.args import int32, router_args, sampling_args
from cluster.cli.client import Options


def add_parsers(sub) -> None:
    chat = sub.add_parser("chat", help="talk with the model served by a running router (one line, one turn)",
                          description="Reads user turns from stdin, one per line, and streams each reply. The "
                                      "whole conversation is sent with each turn. /reset forgets it, /exit or "
                                      "end of input ends the chat.")
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system message opening the conversation")
    sampling_args(chat)
    router_args(chat)
    chat.set_defaults(run=_chat)

    comp = sub.add_parser("complete", help="stream the model's completion of one prompt from a running router")
    comp.add_argument("prompt", help="the prompt text, sent as is (no chat template) unless --chat")
    comp.add_argument("--chat", action="store_true", help="send the prompt as one user message (chat template "
                                                          "applied by the router)")
    comp.add_argument("--json", action="store_true", help="print one JSON object at the end (text, token ids, "
                                                          "finish reason, usage) instead of streaming text")
    comp.add_argument("--logprobs", action="store_true", help="with --json: also each token's log-probability")
    sampling_args(comp)
    router_args(comp)
    comp.set_defaults(run=_complete, parser=comp)

    stat = sub.add_parser("status", help="a running router's state: queue, replicas, their shards")
    stat.add_argument("--json", action="store_true", help="print the Admin.Status answer as JSON")
    router_args(stat)
    stat.set_defaults(run=_status)

    scale = sub.add_parser("scale", help="set the number of replicas of a running router")
    scale.add_argument("replicas", type=int32, help="replicas wanted, >= 1")
    router_args(scale)
    scale.set_defaults(run=_scale)

    drain = sub.add_parser("drain", help="stop a running router gracefully: refuse new requests, finish the rest")
    drain.add_argument("--grace", type=float, default=0.0,
                       help="seconds in-flight requests get before they are cut off (default: router.drain_grace_s)")
    router_args(drain)
    drain.set_defaults(run=_drain)


def _options(args: argparse.Namespace) -> Options:
    return Options(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, stop=tuple(args.stop), logprobs=getattr(args, "logprobs", False))


def _connect(args: argparse.Namespace, body) -> int:
    return client.run(args.command, args.server, body, token_file=args.token_file, tls_ca=args.tls_ca,
                      timeout=args.timeout, plaintext=args.plaintext, err=sys.stderr)


def _chat(args: argparse.Namespace) -> int:
    return _connect(args, lambda router: client.chat(router, _options(args), system=args.system, stdin=sys.stdin,
                                                     out=sys.stdout, err=sys.stderr))


def _complete(args: argparse.Namespace) -> int:
    if args.logprobs and not args.json:
        args.parser.error("--logprobs needs --json (streamed text has nowhere to put them)")
    return _connect(args, lambda router: client.complete(router, args.prompt, _options(args), as_chat=args.chat,
                                                         as_json=args.json, out=sys.stdout, err=sys.stderr))


def _status(args: argparse.Namespace) -> int:
    return _connect(args, lambda router: client.status(router, as_json=args.json, out=sys.stdout))


def _scale(args: argparse.Namespace) -> int:
    return _connect(args, lambda router: client.scale(router, args.replicas, out=sys.stdout))


def _drain(args: argparse.Namespace) -> int:
    return _connect(args, lambda router: client.drain(router, args.grace, out=sys.stdout))
