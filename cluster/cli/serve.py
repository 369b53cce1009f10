"""`caravan serve`: join a Ray cluster (or start a local one that simulates nodes), check the config
against the model and the cluster, deploy the application and stay attached until drained.
`serve_subprocess` runs it as a child process, as a user does, for benchmarks and end-to-end tests.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from cluster.cli import client
from cluster.config import ServeConfig
from cluster.deploy.app import model_dir_for
from cluster.deploy.controller import delete, deploy, serve_config
from cluster.deploy.names import ROUTER
from cluster.deploy.replica_client import ReplicaClient
from cluster.runtime.local_cluster import ray_cluster
from cluster.runtime.placement import format_places

log = logging.getLogger(__name__)



def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    source = str(args.config) if args.config else "<default config>"
    config = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    if args.address:
        config = dataclasses.replace(config, address=args.address)
    if args.port is not None:
        config = dataclasses.replace(config, router=dataclasses.replace(config.router, port=args.port))
    if args.http_port is not None:
        config = dataclasses.replace(config, router=dataclasses.replace(config.router, http_port=args.http_port))
    if args.print_serve_config:
        config.check_model_path(source)
        print(yaml.safe_dump(serve_config(config), sort_keys=False), end="")
        return 0
    model_dir_for(config, source)  # the config against the model and its checkpoint, before Ray starts
    return serve_attached(config, once=args.once, max_tokens=args.max_tokens)


def serve_attached(config: ServeConfig, *, once: str | None = None, max_tokens: int = 64) -> int:
    """`caravan serve`: deploys the application declaratively (as `serve deploy` and the dashboard do),
    prints where everything landed, then stays attached until SIGINT or SIGTERM (which drain the
    router) or until the router has been drained (Admin.Drain, `caravan drain`); exit code 0. With
    `once`, asks the router for one chat answer over gRPC, prints it, and drains. An application it
    deployed on a cluster it joined is deleted on the way out; a local cluster stops with it."""
    with ray_cluster(config) as (address, dashboard):
        start = time.perf_counter()
        deploy(config)
        try:
            for info in asyncio.run(ReplicaClient(config.name).infos()):
                print(f"replica {info.name}: {info.stats.num_blocks} KV blocks\n{format_places(info.shards)}",
                      file=sys.stderr)
            model = Path(config.model.path).name if config.model.path else "smollm2-135m-instruct"
            print(f"serving {model} as {config.replicas} replica(s) of TP {config.layout.tp} x PP {config.layout.pp} "
                  f"on Ray at {address} (up in {time.perf_counter() - start:.1f} s); dashboard {dashboard or 'off'}",
                  file=sys.stderr)
            router = serve.get_deployment_handle(ROUTER, config.name)
            return asyncio.run(_attend(router, once, max_tokens))
        finally:
            if config.address is not None:
                delete(config.name)


async def _attend(router, once: str | None, max_tokens: int) -> int:
    endpoint = await router.endpoint.remote()
    host = "127.0.0.1" if endpoint["host"] in ("0.0.0.0", "::", "[::]") else endpoint["host"]
    where = f"{host}:{endpoint['port']}"
    metrics = f"on :{endpoint['metrics_port']}/metrics" if endpoint["metrics_port"] else "off"
    print(f"router: caravan.v1 on {where} ({'TLS' if endpoint['tls_cert_file'] else 'plaintext'}), health and reflection on; "
          f"metrics {metrics}", file=sys.stderr, flush=True)
    if endpoint.get("http_port"):
        scheme = "https" if endpoint["tls_cert_file"] else "http"
        print(f"router: OpenAI-compatible API on {scheme}://{host}:{endpoint['http_port']}/v1 (chat/completions, "
              "completions, models; /health)", file=sys.stderr, flush=True)
    else:
        print("router: OpenAI-compatible API off (router.http_port: 0)", file=sys.stderr, flush=True)
    draining: list[asyncio.Task] = []

    def drain(grace_s: float | None = None) -> None:
        async def run() -> None:
            in_flight = await router.drain.remote(grace_s)
            print(f"router drained ({in_flight} request(s) were in flight)", file=sys.stderr, flush=True)
        if not draining:
            print("draining the router: no new requests; in-flight ones finish", file=sys.stderr, flush=True)
            draining.append(asyncio.get_running_loop().create_task(run()))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, drain)
    if once is not None:
        try:
            return await _ask_once(router, where, endpoint, once, max_tokens)
        finally:
            drain(0)
            await draining[0]
    print(f"try: caravan chat --server {where}   (Ctrl-C or SIGTERM drains and stops)", file=sys.stderr, flush=True)
    while not draining or not draining[0].done():
        try:
            if await router.wait_stopped.remote(5.0):
                if not draining:
                    print("the router was drained (Admin.Drain); stopping", file=sys.stderr, flush=True)
                break
        except Exception as e:  # the router's replica died; Serve starts another, which answers next time
            log.warning("router unreachable (%s); waiting for Serve to restart it", e)
            await asyncio.sleep(1)
    if draining:
        await draining[0]
    return 0


async def _ask_once(router, where: str, endpoint: dict, prompt: str, max_tokens: int) -> int:
    """One streamed chat answer through the router's gRPC port, by `caravan complete --chat`'s code
    (on a thread: its calls block): the path a client takes."""
    deadline = time.monotonic() + 60
    while not await router.serving.remote():  # the first replica report may still be on its way
        if time.monotonic() > deadline:
            raise RuntimeError("no replica became healthy; see `caravan status` and the Ray dashboard")
        await asyncio.sleep(0.2)
    options = client.Options(max_tokens=max_tokens, temperature=0)

    def ask(stub: client.Router) -> int:
        return client.complete(stub, prompt, options, as_chat=True, as_json=False, out=sys.stdout, err=sys.stderr)
    return await asyncio.to_thread(client.run, "serve", where, ask, token_file=endpoint["token_file"] and Path(endpoint["token_file"]),
                                   tls_ca=Path(endpoint["tls_cert_file"]) if endpoint["tls_cert_file"] else None,
                                   err=sys.stderr)


@contextmanager
def serve_subprocess(config_path: Path, target: str, *, timeout_s: float = 300.0, stop_s: float = 90.0,
                     tls_ca: Path | None = None) -> Iterator[subprocess.Popen]:
    """`caravan serve CONFIG` in a child process, as a user starts it (its output in serve.log beside the
    config), for scripts that drive a server as clients do: benchmarks and end-to-end tests. Yields the
    process once the router at `target` reports SERVING (over TLS, trusting `tls_ca`, when it is given); a
    child that exits first, or does not serve within `timeout_s`, is a RuntimeError quoting the end of its
    log. At the end, SIGTERM (a drain), and a kill if it has not stopped within `stop_s`."""
    log_path = config_path.parent / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", str(config_path)], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            channel = (grpc.insecure_channel(target) if tls_ca is None else
                       grpc.secure_channel(target, grpc.ssl_channel_credentials(tls_ca.read_bytes())))
            with channel:
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"caravan serve exited {proc.returncode} before serving; {log_path} "
                                           f"ends:\n{log_path.read_text()[-2000:]}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"caravan serve did not serve within {timeout_s:g} s; see {log_path}")
                    try:
                        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                        if status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass  # not listening yet
                    time.sleep(0.25)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(stop_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
