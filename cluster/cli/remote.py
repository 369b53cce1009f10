"""The commands that talk to a running router over gRPC: chat, complete, status, scale, drain (their gRPC
side is `cluster.cli.client`)."""

from __future__ import annotations

import argparse
import sys

from cluster.cli import client
from cluster.cli.client import Options


def _options(args: argparse.Namespace) -> Options:
    return Options(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, stop=tuple(args.stop), logprobs=getattr(args, "logprobs", False))


def _connect(args: argparse.Namespace, body) -> int:
    return client.run(args.command, args.server, body, token_file=args.token_file, tls_ca=args.tls_ca,
                      timeout=args.timeout, plaintext=args.plaintext, err=sys.stderr)


def chat(args: argparse.Namespace) -> int:
    return _connect(args, lambda router: client.chat(router, _options(args), system=args.system, stdin=sys.stdin,
                                                     out=sys.stdout, err=sys.stderr))


def complete(args: argparse.Namespace) -> int:
    if args.logprobs and not args.json:
        args.parser.error("--logprobs needs --json (streamed text has nowhere to put them)")
    return _connect(args, lambda router: client.complete(router, args.prompt, _options(args), as_chat=args.chat,
                                                         as_json=args.json, out=sys.stdout, err=sys.stderr))


def status(args: argparse.Namespace) -> int:
    return _connect(args, lambda router: client.status(router, as_json=args.json, out=sys.stdout))


def scale(args: argparse.Namespace) -> int:
    return _connect(args, lambda router: client.scale(router, args.replicas, out=sys.stdout))


def drain(args: argparse.Namespace) -> int:
    return _connect(args, lambda router: client.drain(router, args.grace, out=sys.stdout))
