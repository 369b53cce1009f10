"""`caravan`: the command line. Subcommands: generate (offline, local processes), serve, plan, doctor (a
Ray cluster's links before it serves), and the clients of a running router: chat, complete, status,
scale, drain. One module per command, each adding its parser and its `run`."""

from __future__ import annotations

import argparse
import sys

from cluster.cli import doctor, generate, plan, remote, serve
from cluster.config import ConfigError as ServeConfigError
from cluster.deploy.controller import AppError
from cluster.engine.request import RequestError
from cluster.runtime.kv_budget import KVBudgetError
from cluster.runtime.placement import PlacementError
from cluster.api.tokenizer import TokenizerError
from shard.config import ConfigError
from shard.demo import DemoModelError
from shard.layout import LayoutError
from shard.loader import CheckpointError
from shard.sampler import SamplingError

USER_ERRORS = (ConfigError, LayoutError, CheckpointError, SamplingError, RequestError, TokenizerError, DemoModelError,
               FileNotFoundError, ServeConfigError, PlacementError, AppError, KVBudgetError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caravan", description="Serve one huge Llama across many GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    serve.add_parser(sub)
    plan.add_parser(sub)
    remote.add_parsers(sub)
    doctor.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"caravan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
