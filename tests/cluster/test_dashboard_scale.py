"""Scaling from the Ray dashboard while traffic flows, as an operator does it: `caravan serve` (local
cluster, token auth on) deploys the application declaratively; the dashboard's Serve REST API
(`GET`/`PUT /api/serve/applications/`, with Ray's bearer token) takes it 1 -> 2 -> 1 replicas while
a steady load of gRPC requests runs. No request may fail, the new replica must serve once healthy,
and the removed one must finish what it had in flight."""

from __future__ import annotations

import json
import subprocess
import sys
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from caravan.v1 import admin_pb2 as apb
from caravan.v1 import inference_pb2 as pb
from tests.cluster.routerfixture import Clients, caravan_serve

pytestmark = pytest.mark.slow

TOKEN = "scale-test-token"
CLIENTS = 3


class Dashboard:
    """The Serve REST API with Ray's token, as the README's curl commands use it."""

    def __init__(self, url: str):
        self.url = url if "://" in url else f"http://{url}"
        self.token = (Path.home() / ".ray" / "auth_token").read_text().strip()

    def request(self, method: str, body: dict | None = None, token: str | None = "") -> tuple[int, dict | str]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        req = urllib.request.Request(f"{self.url}/api/serve/applications/", method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read().decode()
                return resp.status, json.loads(text) if text else ""
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def set_replicas(self, replicas: int) -> None:
        """GET the deployed config, change num_replicas, PUT it back: what the README shows."""
        status, details = self.request("GET")
        assert status == 200, details
        app = details["applications"]["caravan"]
        assert app["source"] == "declarative"
        config = app["deployed_app_config"]
        (replica,) = [d for d in config["deployments"] if d["name"] == "replica"]
        replica["num_replicas"] = replicas
        status, text = self.request("PUT", {"proxy_location": "Disabled", "applications": [config]})
        assert status == 200, text


class Load:
    """CLIENTS threads, each sending one short chat request after another until stopped (bounded)."""

    def __init__(self, clients: Clients):
        self.clients, self.stop = clients, threading.Event()
        self.ok, self.failed = 0, []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def run(self, i: int) -> None:
        for n in range(2000):
            if self.stop.is_set():
                return
            req = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=f"Count to {n % 9 + 3}.")]),
                                     sampling=pb.SamplingParams(temperature=0), max_tokens=12)
            try:
                out = list(self.clients.inference.Generate(req, metadata=self.clients.auth, timeout=120))
                assert out and out[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
                with self.lock:
                    self.ok += 1
            except (grpc.RpcError, AssertionError) as e:
                with self.lock:
                    self.failed.append(f"client {i} request {n}: {e}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(150)


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir):
    with caravan_serve(tmp_path_factory.mktemp("scale"), """\
layout: {tp: 1, pp: 1}
kv_cache: {num_blocks: 256}
timeouts: {step_s: 10, health_check_period_s: 0.5}
local_cluster: {nodes: 2, gpus_per_node: 1}
""", TOKEN, metrics_port=0, drain_grace_s=60) as clients:
        found = re.search(r"dashboard (\S+)", clients.log_path.read_text())
        assert found and found[1] != "off", "caravan serve did not print the dashboard's address"
        clients.dashboard = Dashboard(found[1])
        yield clients


def serving_replicas(clients: Clients) -> dict[str, apb.ReplicaStatus]:
    return {r.name: r for r in clients.status().replicas if r.state == apb.REPLICA_STATE_SERVING}


def wait_for(what: str, predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"{what} not within {timeout_s} s")


def test_the_dashboard_api_needs_rays_token(server):
    assert server.dashboard.request("GET", token=None)[0] == 401
    assert server.dashboard.request("GET", token="wrong")[0] == 403
    status, details = server.dashboard.request("GET")
    assert status == 200 and details["applications"]["caravan"]["source"] == "declarative"
    deployments = details["applications"]["caravan"]["deployments"]
    assert set(deployments) == {"replica", "router"} and deployments["replica"]["target_num_replicas"] == 1


def test_scaling_1_2_1_through_the_dashboard_under_load_fails_no_request(server):
    (first,) = serving_replicas(server)
    with Load(server) as load:
        wait_for("the first requests", lambda: load.ok >= 3, 60)

        started = time.monotonic()
        server.dashboard.set_replicas(2)
        wait_for("the router to see the new target", lambda: server.status().replicas_target == 2, 30)
        both = wait_for("a second serving replica", lambda: len(serving_replicas(server)) == 2 and serving_replicas(server),
                        180)
        up_s = time.monotonic() - started
        (new,) = set(both) - {first}
        steps_at_healthy = both[new].steps
        # The capacity router sends the new, emptier replica its share of the load: more than its idle
        # probes (one step per health check) would ever run.
        wait_for("the new replica to serve requests",
                 lambda: serving_replicas(server).get(new) and serving_replicas(server)[new].steps >= steps_at_healthy + 24,
                 60)

        started = time.monotonic()
        server.dashboard.set_replicas(1)
        wait_for("the router to see the target back at 1", lambda: server.status().replicas_target == 1, 30)
        (left,) = wait_for("one replica left", lambda: len(server.status().replicas) == 1 and serving_replicas(server),
                           120)
        down_s = time.monotonic() - started
        served_before = load.ok
        wait_for("requests served after scaling in", lambda: load.ok >= served_before + 3, 60)
    print(f"dashboard scale: 1 -> 2 serving in {up_s:.1f} s, 2 -> 1 in {down_s:.1f} s ({left} kept); "
          f"{load.ok} requests served under load, {len(load.failed)} failed")
    assert load.failed == []
    assert load.ok >= 10


def test_caravan_drain_stops_caravan_serve_with_exit_0(server):
    token = server.log_path.parent / "admin_token"
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "drain", "--server", server.target, "--token-file",
                             str(token)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "draining: 0 request(s) in flight" in result.stdout, result.stderr
    assert server.proc.wait(60) == 0
    assert "the router was drained (Admin.Drain); stopping" in server.log_path.read_text()
