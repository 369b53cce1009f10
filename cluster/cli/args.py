"""Arguments several commands share: the model and layout, the router's address and credentials, sampling."""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.config import DTYPES
from shard.demo import ensure_demo_model

DEFAULT_SERVER = "localhost:50051"
# Status and Scale answer at once; a router that takes longer is stuck, and saying so beats hanging.
UNARY_TIMEOUT_S = 10.0


def model_args(p: argparse.ArgumentParser, dtype_default: str = "float32") -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face checkpoint folder (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: ranks per stage (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree: stages (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=dtype_default, help=f"default {dtype_default}")


def cluster_args(p: argparse.ArgumentParser) -> None:
    """The config and the Ray cluster of a command that deploys or probes replicas (serve, doctor)."""
    p.add_argument("config", nargs="?", type=Path, default=None,
                   help="cluster config YAML (default: SmolLM2, TP 3 x PP 2, on a local Ray cluster simulating "
                        "2 nodes); every key is listed in cluster/config.py")
    p.add_argument("--address", default=None, help="join this Ray cluster (auto, or HOST:PORT; auto inside a Ray "
                                                   "job) instead of the config's address or a local one")


def router_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--plaintext", action="store_true",
                   help="send the bearer token over a plaintext channel to a router that is not on this machine "
                        "(refused without it: only on a network you trust)")


def sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int32, default=None, help="tokens to generate at most (default: the "
                                                                   "router's, 256 or what the context leaves)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="softmax temperature; 0 is greedy. Default 0 here, so answers are reproducible (the "
                        "router's own default is 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: 1.0)")
    p.add_argument("--top-k", type=int32, default=None, help="sample from the k likeliest tokens (default: all)")
    p.add_argument("--seed", type=uint64, default=None, help="seed for reproducible sampling (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the text contains this (not included); repeatable")


def int32(text: str) -> int:
    value = int(text)
    if not -2**31 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{text} does not fit in 32 bits")
    return value


def uint64(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 2**64)")
    return value


def model_dir(args: argparse.Namespace) -> Path:
    if args.model is not None:
        if not args.model.is_dir():
            raise FileNotFoundError(f"--model {args.model} is not a folder; give a Hugging Face checkpoint folder")
        return args.model
    return ensure_demo_model()
