"""A router on a thread of its own (its own event loop), or `caravan serve` in a process of its own, for tests
that talk to it as clients do (gRPC, HTTP)."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from caravan.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from cluster.api.backend import LocalBackend
from cluster.api.server import build_router
from cluster.cli.serve import serve_subprocess
from cluster.config import ServeConfig
from cluster.engine.engine import Engine, EngineStats
from cluster.engine.executor import LocalExecutor
from cluster.engine.grammar import Grammars
from cluster.engine.request import checkpoint_eos_ids
from cluster.engine.scheduler import TokenUpdate
from cluster.runtime.ports import free_port
from cluster.runtime.report import ReplicaInfo
from shard.sampler import Sample


@contextmanager
def caravan_serve(folder: Path, config_yaml: str, token: str, tls: tuple[Path, Path] | None = None,
                  **router) -> Iterator[Clients]:
    """`caravan serve CONFIG` in its own process, as a user starts it, with `config_yaml` and a router
    section of `router`'s keys, on free ports (gRPC and HTTP), with `token` in the file `token` for every
    RPC, until it serves; SIGTERM at the end. With `tls` (key, certificate: `self_signed_cert`), the router
    serves TLS and the clients trust that certificate. The clients also carry the process, its log, the
    config's path and the HTTP API's base URL (`http`, or https with TLS)."""
    if tls is not None:
        router = {"tls_key_file": str(tls[0]), "tls_cert_file": str(tls[1]), **router}
    port = free_port()
    (folder / "token").write_text(token)
    (folder / "admin_token").write_text(f"admin-{token}")
    section = {"port": port, "http_port": free_port(), "auth_token_file": "token", "admin_token_file": "admin_token",
               **router}
    (folder / "cluster.yaml").write_text(config_yaml + "router: {" + ", ".join(
        f"{k}: {'null' if v is None else v}" for k, v in section.items()) + "}\n")
    target = f"127.0.0.1:{port}"
    ca = None if tls is None else tls[1]
    channel = (grpc.insecure_channel(target) if ca is None else
               grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes())))
    try:
        with serve_subprocess(folder / "cluster.yaml", target, timeout_s=240, tls_ca=ca) as proc:
            clients = Clients(channel, token, f"admin-{token}")
            clients.proc, clients.log_path, clients.target = proc, folder / "serve.log", target
            clients.config_path = folder / "cluster.yaml"
            scheme = "http" if ca is None else "https"
            clients.http = f"{scheme}://127.0.0.1:{section['http_port']}" if section["http_port"] else None
            yield clients
    finally:
        channel.close()
        print((folder / "serve.log").read_text()[-3000:])


def local_router(model_dir: Path, worker, tmp_path: Path, num_blocks: int, block_size: int, **router) -> RouterThread:
    """A router over one in-process engine on `worker` (SmolLM2), on free ports (gRPC, HTTP, metrics)."""
    config = ServeConfig.from_dict({"router": {"port": 0, "http_port": free_port(), "metrics_port": 0, **router},
                                    "timeouts": {"health_check_period_s": 0.25, "step_s": 10}})

    async def make():
        engine = Engine(LocalExecutor(worker), worker.cfg, checkpoint_eos_ids(model_dir), num_blocks=num_blocks,
                        block_size=block_size, max_num_seqs=128, max_tokens_per_step=512, step_timeout_s=10,
                        grammars=Grammars(model_dir, worker.cfg.vocab_size, checkpoint_eos_ids(model_dir)))
        r = build_router(config, str(model_dir), LocalBackend(engine, probe_after_s=0.25),
                         default_token_file=tmp_path / "auth_token")
        await r.start()
        return r
    return RouterThread(make)


class RouterThread:
    def __init__(self, make_router, timeout_s: float = 60):
        """make_router: a coroutine function run on the router's loop, returning a started Router."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-router")
        self.thread.start()
        try:
            self.router = self.call(make_router(), timeout_s)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self.target = f"127.0.0.1:{self.router.port}"

    def call(self, coro, timeout_s: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def close(self) -> None:
        if not self.router.stopped.is_set():
            self.call(self.router.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Clients:
    """Stubs over one channel, with the inference token (`auth`) and the admin token (`admin_auth`) at hand."""

    def __init__(self, channel: grpc.Channel, token: str, admin_token: str | None = None):
        self.channel = channel
        self.inference = inference_pb2_grpc.InferenceStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.auth = (("authorization", f"Bearer {token}"),)
        self.admin_auth = (("authorization", f"Bearer {admin_token or token}"),)

    @classmethod
    def of(cls, channel: grpc.Channel, router) -> Clients:
        """Clients of an in-process router, with its own tokens."""
        creds = router.credentials
        return cls(channel, creds.inference or "", creds.admin)

    def status(self):
        return self.admin.Status(admin_pb2.StatusRequest(), metadata=self.admin_auth, timeout=10)

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def wait_health(self, want: int, service: str = "", timeout_s: float = 60) -> float:
        """Seconds until health reports `want`; fails the test past the timeout."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            try:
                if self.health_status(service) == want:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"health of {service!r} did not become {want} within {timeout_s} s "
                             f"(now {self.health_status(service)})")

    def wait_all_blocks_free(self, timeout_s: float) -> float:
        """Seconds until every replica reports all its KV blocks free."""
        start = time.monotonic()
        while True:
            replicas = self.status().replicas
            if replicas and all(r.kv_blocks_free == r.kv_blocks_total for r in replicas):
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"KV blocks still in use after {timeout_s} s: "
                                     f"{[(r.name, r.kv_blocks_free, r.kv_blocks_total) for r in replicas]}")
            time.sleep(0.02)


def expect_malformed(clients: Clients, suite) -> None:
    """Sends each case as raw bytes (with the admin token to Admin, the inference token to the rest);
    each must fail with exactly its code and details that start with its field's path."""
    for case in suite:
        streaming = case.method.endswith("/Generate")
        call = (clients.channel.unary_stream if streaming else clients.channel.unary_unary)(
            case.method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            result = call(case.request, timeout=30, metadata=clients.admin_auth if case.admin else clients.auth)
            if streaming:
                list(result)
        assert (e.value.code(), e.value.details().split(":")[0]) == (case.code, case.field), case.name


def flood(target: str, requests: list, metadata=None) -> list[tuple]:
    """Sends every Generate request at once. Each result is ("ok", tokens received, seconds) or
    (gRPC code, details, seconds), seconds counted from that request's send."""
    async def run():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            async def one(request):
                start = time.monotonic()
                try:
                    n = 0
                    async for r in stub.Generate(request, metadata=metadata):
                        n += len(r.token_ids)
                    return "ok", n, time.monotonic() - start
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details(), time.monotonic() - start
            return await asyncio.gather(*(one(r) for r in requests))
    return asyncio.run(run())


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """(key, certificate) for 127.0.0.1, made by openssl; skips the test where openssl cannot."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        pytest.skip(f"openssl cannot make a test certificate: {e}")
    return key, cert


# ---- a backend without replicas, for the router's own rules ----

def stub_stats(failed: str | None = None) -> EngineStats:
    return EngineStats(num_blocks=8, free_blocks=8, running=0, waiting=0, steps=3, preemptions=0, queued_tokens=0,
                       failed=failed)


def stub_info(name: str, stats: EngineStats | None = None, progress_age_s: float = 0.1) -> ReplicaInfo:
    return ReplicaInfo(name, [], stats or stub_stats(), progress_age_s=progress_age_s, shard_healthy=[])


class StubBackend:
    """Replica reports set by the test (one serving replica with `serving`); generate waits until
    `release` is set (from any thread), then gives one token, or raises `fail`."""

    def __init__(self, serving: bool = False, fail: Exception | None = None):
        self.reports = [stub_info("a")] if serving else []
        self.release, self.fail = threading.Event(), fail

    async def generate(self, prompt_ids, params):
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        if self.fail is not None:
            raise self.fail
        yield TokenUpdate(0, Sample(72), "length")

    async def infos(self):
        return list(self.reports)

    async def scale(self, replicas):
        return 1

    async def target_replicas(self):
        return 1

    async def pending(self, reporting):
        return "" if reporting else "1 replica(s) starting (placement, shards, weights)"

    async def close(self):
        self.release.set()
