"""`caravan doctor`: check a Ray cluster before it serves (`cluster.doctor`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from cluster.config import ConfigError, ServeConfig
from cluster.doctor.diagnose import diagnose
from cluster.doctor.findings import format_report, parse_size
from cluster.doctor.probes import Options


def add_parser(sub) -> None:
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
    doc.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    if args.address:
        config = dataclasses.replace(config, address=args.address)
    if not args.timeout > 0:
        raise ConfigError("--timeout", f"got {args.timeout:g}; use a number of seconds > 0", "command line")
    options = Options(args.timeout, parse_size("--small-bytes", args.small_bytes),
                      args.large_bytes and parse_size("--large-bytes", args.large_bytes))
    report = diagnose(config, options, log=lambda line: print(f"doctor: {line}", file=sys.stderr, flush=True))
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return report.exit_code
