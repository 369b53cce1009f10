"""`caravan doctor`: check a Ray cluster before it serves (`cluster.doctor`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from cluster.config import ConfigError, ServeConfig
from cluster.doctor.diagnose import diagnose
from cluster.doctor.findings import format_report, parse_size
from cluster.doctor.probes import Options


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
