"""Recovery as a user sees it through gRPC: `caravan serve` with the embedded default (one replica,
SmolLM2 at TP 3 x PP 2 on the simulated two-node cluster) under load from several clients, when one
shard process is killed. The replica repairs itself in place; requests sent meanwhile wait for it
and succeed; none is lost."""

from __future__ import annotations

import re
import threading
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2

from caravan.v1 import inference_pb2 as pb
from tests.cluster.routerfixture import caravan_serve

pytestmark = pytest.mark.slow

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN = "test-token-9d1e"
RECOVERY_S = 15.0


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir):
    # The embedded default layout and timeouts; only the router's port and token are the test's.
    with caravan_serve(tmp_path_factory.mktemp("recovery"), "", TOKEN, metrics_port=None) as clients:
        yield clients


def ask(server, i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=f"Count to {i % 7 + 3}.")]),
                              sampling=pb.SamplingParams(temperature=0), max_tokens=12)


def test_a_killed_shard_under_load_costs_seconds_and_no_request(server):
    (replica,) = server.status().replicas
    assert len(replica.shards) == 6
    stop, lock = threading.Event(), threading.Lock()
    results: list[tuple[float, float, object]] = []   # (sent, finished, tokens or the error)

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            sent = time.monotonic()
            try:
                responses = list(server.inference.Generate(ask(server, i), metadata=server.auth, timeout=60))
                outcome: object = sum(len(r.token_ids) for r in responses)
                assert responses[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            except grpc.RpcError as e:
                outcome = e
            with lock:
                results.append((sent, time.monotonic(), outcome))
            i += 3

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(4)  # load running
    shards = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
              if " ".join(p.cmdline()).startswith("ray::ShardActor")]
    assert len(shards) == 6, [p.cmdline() for p in shards]
    shards[4].kill()
    killed = time.monotonic()
    down = server.wait_health(NOT_SERVING, timeout_s=RECOVERY_S)
    server.wait_health(SERVING, timeout_s=60)
    recovered = time.monotonic() - killed
    time.sleep(4)  # load goes on after the repair
    stop.set()
    for t in threads:
        t.join(90)

    errors = [o for *_, o in results if isinstance(o, grpc.RpcError)]
    during = [(s, f) for s, f, o in results if not isinstance(o, grpc.RpcError) and killed <= f and s <= killed + recovered]
    log = server.log_path.read_text()
    repaired = re.findall(r"repaired: (.*)", log)
    print(f"kill -> NOT_SERVING {down:.1f} s, SERVING again {recovered:.1f} s after the kill; {len(results)} requests, "
          f"{len(during)} of them finished during or right after the outage, {len(errors)} failed; repair: "
          f"{repaired[-1] if repaired else 'not in the log'}")
    assert not errors, [(e.code(), e.details()) for e in errors[:5]]
    assert recovered <= RECOVERY_S
    assert during, "no request was in flight across the outage"
    assert repaired, log[-3000:]
    (after,) = server.status().replicas
    assert after.name == replica.name and after.state == replica.state  # repaired in place, not replaced
    server.wait_all_blocks_free(timeout_s=5)
