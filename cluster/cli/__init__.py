"""`caravan`: the command line. Subcommands: generate (offline, local processes), serve, plan, doctor (a
Ray cluster's links before it serves), and the clients of a running router: chat, complete, status,
scale, drain. Their arguments are in `cluster.cli.parsers`; each command is a module here, imported
only when it runs, so that `--help` and a bad flag answer at once."""

from __future__ import annotations

import argparse
import importlib
import sys

from cluster.cli import parsers
from shard.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caravan", description="Serve one huge Llama across many GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in parsers.COMMANDS:
        getattr(parsers, name)(sub)
    args = parser.parse_args(argv)
    module, function = args.run.split(":")
    try:
        run = getattr(importlib.import_module(f"cluster.cli.{module}"), function)
        return run(args)
    except (UserError, FileNotFoundError) as e:
        print(f"caravan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
