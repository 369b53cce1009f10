"""`caravan serve`: join a Ray cluster (or start a local one that simulates nodes), check the config
against the model and the cluster, and bring up the replicas.

The local cluster is `ray.cluster_utils.Cluster`: a head node for Serve and the engines, plus
`local_cluster.nodes` worker nodes, each with fake GPUs (Ray only counts them; the shards compute
on CPU), so placement runs exactly as on a real multi-node cluster. Token authentication stays
on: the local cluster is started with it, and a token is created in ~/.ray/auth_token if missing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cluster.config import ServeConfig
from shard.config import ModelConfig
from shard.layout import Layout, check_layout
from shard.loader import Checkpoint

log = logging.getLogger(__name__)


def model_dir_for(config: ServeConfig, source: str) -> str:
    """The checkpoint to serve, checked (config, layout, tensor headers) before anything starts."""
    if config.model.path is None:
        from shard.demo import ensure_demo_model
        path = ensure_demo_model()
    else:
        config.check_model_path(source)
        path = Path(config.model.path)
    model = ModelConfig.from_pretrained(path)
    check_layout(model, Layout(config.layout.tp, config.layout.pp))
    Checkpoint.open(path).validate(model)
    return str(path)


@contextmanager
def ray_cluster(config: ServeConfig) -> Iterator[tuple[str, str | None]]:
    """Connects to `config.address`, or starts the simulated local cluster; yields (address,
    dashboard URL) and disconnects (and stops a cluster it started) on exit."""
    if config.address is None:
        _enable_token_auth()  # before Ray reads its config
    import ray
    if config.address is not None:
        ctx = ray.init(address=config.address, logging_level=logging.WARNING)
        try:
            yield config.address, ctx.dashboard_url
        finally:
            ray.shutdown()
        return
    from ray.cluster_utils import Cluster
    local = config.local_cluster
    gpus = local.gpus_for(config.layout, config.replicas)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                            "dashboard_port": dashboard_port()})
    try:
        for i in range(local.nodes):
            cluster.add_node(num_cpus=local.cpus_per_node, num_gpus=gpus)
        log.info("local Ray cluster: head + %d nodes with %d simulated GPUs each", local.nodes, gpus)
        ctx = ray.init(address=cluster.address, logging_level=logging.WARNING)
        yield cluster.address, ctx.dashboard_url
    finally:
        ray.shutdown()
        cluster.shutdown()


def _enable_token_auth() -> None:
    """Ray's own `ray.init()` turns token auth on for a new cluster; `Cluster` does not, so do it
    the same way: the mode for this process and its children, and a token on disk."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if "ray" in sys.modules:  # Ray caches its config at import; read the mode again
        from ray._raylet import Config
        Config.initialize("")
    token = Path.home() / ".ray" / "auth_token"
    if os.environ["RAY_AUTH_MODE"] == "token" and not token.exists() and "RAY_AUTH_TOKEN" not in os.environ:
        import secrets
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)


def serve_attached(config: ServeConfig, *, once: str | None = None, max_tokens: int = 64) -> int:
    """`caravan serve`: deploys the application declaratively (as `serve deploy` and the dashboard do),
    prints where everything landed, then stays attached until SIGINT or SIGTERM (which drain the
    router) or until the router has been drained (Admin.Drain, `caravan drain`); exit code 0. With
    `once`, asks the router for one chat answer over gRPC, prints it, and drains. An application it
    deployed on a cluster it joined is deleted on the way out; a local cluster stops with it."""
    from ray import serve

    from cluster.app import ROUTER, deploy
    from cluster.placement import format_places
    from cluster.serve import ReplicaClient

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
                from cluster.app import delete
                delete(config.name)


async def _attend(router, once: str | None, max_tokens: int) -> int:
    endpoint = await router.endpoint.remote()
    host = "127.0.0.1" if endpoint["host"] in ("0.0.0.0", "::", "[::]") else endpoint["host"]
    where = f"{host}:{endpoint['port']}"
    metrics = f"on :{endpoint['metrics_port']}/metrics" if endpoint["metrics_port"] else "off"
    print(f"router: caravan.v1 on {where} ({'TLS' if endpoint['tls_cert_file'] else 'plaintext'}), health and reflection on; "
          f"metrics {metrics}", file=sys.stderr, flush=True)
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
    from cluster import client

    deadline = time.monotonic() + 60
    while not await router.serving.remote():  # the first replica report may still be on its way
        if time.monotonic() > deadline:
            raise RuntimeError("no replica became healthy; see `caravan status` and the Ray dashboard")
        await asyncio.sleep(0.2)
    options = client.Options(max_tokens=max_tokens, temperature=0)

    def ask(stub: client.Router) -> int:
        return client.complete(stub, prompt, options, as_chat=True, as_json=False, out=sys.stdout, err=sys.stderr)
    return await asyncio.to_thread(client.run, "serve", where, ask, token_file=Path(endpoint["token_file"]),
                                   tls_ca=Path(endpoint["tls_cert_file"]) if endpoint["tls_cert_file"] else None,
                                   err=sys.stderr)


def dashboard_port(preferred: int = 8265) -> int:
    """Ray's usual dashboard port, or a free one when something (another local Ray cluster) holds it:
    the dashboard's URL is printed either way."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a router started next (router.port 0 would hide it from the
    caller, who must know where to connect)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def serve_subprocess(config_path: Path, target: str, *, timeout_s: float = 300.0,
                     stop_s: float = 90.0) -> Iterator[subprocess.Popen]:
    """`caravan serve CONFIG` in a child process, as a user starts it (its output in serve.log beside the
    config), for scripts that drive a server as clients do: benchmarks and end-to-end tests. Yields the
    process once the router at `target` reports SERVING; a child that exits first, or does not serve
    within `timeout_s`, is a RuntimeError quoting the end of its log. At the end, SIGTERM (a drain),
    and a kill if it has not stopped within `stop_s`."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    log_path = config_path.parent / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", str(config_path)], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            with grpc.insecure_channel(target) as channel:
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
