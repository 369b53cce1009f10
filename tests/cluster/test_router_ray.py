"""The whole thing as a user runs it: `caravan serve` in its own process (a local Ray cluster
simulating 2 nodes, SmolLM2 at TP 1 x PP 2, the gRPC router in front as the application's `router`
deployment), driven only through gRPC. The tests run in file order on one server; the last one
drains it with SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from caravan.v1 import admin_pb2 as apb
from caravan.v1 import inference_pb2 as pb
from caravan.v1 import inference_pb2_grpc
from tests.cluster.malformed import cases
from tests.cluster.routerfixture import caravan_serve, expect_malformed, flood

pytestmark = pytest.mark.slow

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN = "test-token-4f9c"
MAX_IN_FLIGHT = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir):
    with caravan_serve(tmp_path_factory.mktemp("serve"), """\
layout: {tp: 1, pp: 2}
kv_cache: {num_blocks: 512}
scheduler: {max_num_seqs: 128, max_tokens_per_step: 512}
timeouts: {step_s: 10, health_check_period_s: 0.25}
""", TOKEN, metrics_port=0, max_in_flight=MAX_IN_FLIGHT, drain_grace_s=20) as clients:
        yield clients


def chat(text: str, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=text)]), **kw)


def test_streamed_chat_answer_in_english(server):
    responses = list(server.inference.Generate(
        chat("What is the capital of France?", sampling=pb.SamplingParams(temperature=0), max_tokens=24),
        metadata=server.auth, timeout=60))
    assert "Paris" in "".join(r.text for r in responses) and len(responses) > 3
    assert responses[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED and responses[-1].usage.completion_tokens > 3
    info = server.inference.ModelInfo(pb.ModelInfoRequest(), metadata=server.auth, timeout=10)
    assert (info.tensor_parallel, info.pipeline_parallel, info.replicas) == (1, 2, 1)


def test_every_rpc_needs_the_token_but_health(server):
    for md in (None, (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as e:
            list(server.inference.Generate(chat("Hi", max_tokens=2), metadata=md, timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            server.inference.ModelInfo(pb.ModelInfoRequest(), metadata=md, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.health_status() == SERVING


def test_status_shows_each_shard_on_its_node(server):
    (replica,) = server.status().replicas
    assert replica.state == apb.REPLICA_STATE_SERVING and replica.kv_blocks_total == 512
    assert [(s.rank, s.stage) for s in replica.shards] == [(0, 0), (1, 1)]
    assert all(s.healthy for s in replica.shards) and replica.shards[0].node_id != replica.shards[1].node_id


def test_malformed_requests(server):
    suite = cases(8192, 49152)
    assert len(suite) >= 200
    expect_malformed(server, suite)
    assert server.health_status() == SERVING
    server.wait_all_blocks_free(timeout_s=3)
    assert server.status().in_flight == 0


def test_cancelled_streams_free_every_block_within_a_second(server):
    async def run() -> float:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            calls = []
            for wave in range(4):  # 100 in waves under max_in_flight
                batch = [stub.Generate(chat(f"Write a long essay about topic {wave}-{i}.", max_tokens=400,
                                            sampling=pb.SamplingParams(temperature=0.8, seed=i)),
                                       metadata=server.auth) for i in range(25)]
                await asyncio.wait_for(asyncio.gather(*(call.read() for call in batch)), 120)
                calls += batch
                if wave < 3:
                    for call in batch:
                        call.cancel()
            for call in calls[75:]:
                call.cancel()
            return time.monotonic()

    cancelled_at = asyncio.run(run())
    server.wait_all_blocks_free(timeout_s=5)
    freed = time.monotonic() - cancelled_at
    print(f"every KV block free {freed:.2f} s after the last cancel (Status sees reports every 0.25 s)")
    assert freed <= 1.0
    assert server.status().in_flight == 0


def router_process(server) -> psutil.Process:
    """The router runs in its Serve replica's process, `ray::ServeReplica:<app>:router`."""
    (router,) = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                 if " ".join(p.cmdline()).startswith("ray::ServeReplica:caravan:router")]
    return router


def test_overload_is_refused_at_once_with_bounded_memory(server):
    router = router_process(server)
    rss_before = router.memory_info().rss

    results = flood(server.target, [chat(f"Say hello to {i}.", max_tokens=16) for i in range(4 * MAX_IN_FLIGHT)],
                    metadata=server.auth)
    rss_after = router.memory_info().rss
    ok = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    print(f"overload: {len(ok)} served, {len(refused)} refused in at most {max(t for *_, t in refused):.3f} s; "
          f"router RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert len(ok) + len(refused) == len(results) and len(ok) >= MAX_IN_FLIGHT and len(refused) >= 2 * MAX_IN_FLIGHT
    assert all(n >= 1 for _, n, _ in ok)
    assert max(t for *_, t in refused) < 1.0
    assert rss_after - rss_before < 64 * 2**20
    server.wait_all_blocks_free(timeout_s=3)


def test_doctor_on_a_cluster_whose_gpus_all_serve_reports_the_replicas_health(server):
    """As `helm test` runs it after an install: no GPU is free for probes, so the serving replica's
    health stands in for them, and the check passes."""
    address = re.search(r"on Ray at (\S+) ", server.log_path.read_text())[1]
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "doctor", str(server.config_path), "--address",
                             address], capture_output=True, text=True, timeout=120, env={**os.environ,
                                                                                        "RAY_AUTH_MODE": "token"})
    print(result.stdout, result.stderr[-2000:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARN [placement] application 'caravan' serves and holds the GPUs (0 free" in result.stdout
    assert re.search(r"INFO \[replica\] replica caravan-\w+ serves: its 2 shards pass every TP all-reduce", result.stdout)


def test_health_flips_when_the_only_replica_loses_a_shard_and_requests_wait_for_its_repair(server):
    reflect = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               metadata=server.auth, timeout=10))
    assert {"caravan.v1.Inference", "caravan.v1.Admin", "grpc.health.v1.Health"} <= {
        s.name for s in answer.list_services_response.service}
    (replica,) = server.status().replicas
    assert server.health_status(f"caravan.replica.{replica.name}") == SERVING

    shards = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
              if " ".join(p.cmdline()).startswith("ray::ShardActor")]
    assert len(shards) == 2, [p.cmdline() for p in shards]
    shards[1].kill()
    down = server.wait_health(NOT_SERVING, timeout_s=30)
    # Sent while nothing serves: it waits for the repair (router.wait_for_replica_s) and is answered.
    answer = "".join(r.text for r in server.inference.Generate(
        chat("What is the capital of France?", sampling=pb.SamplingParams(temperature=0), max_tokens=16),
        metadata=server.auth, timeout=60))
    up = server.wait_health(SERVING, timeout_s=60)
    print(f"NOT_SERVING {down:.1f} s after the shard was killed; SERVING again {up:.1f} s later")
    assert "Paris" in answer
    (new,) = server.status().replicas
    assert new.name == replica.name  # repaired in place
    assert [s.healthy for s in new.shards] == [True, True] and new.shards[1].node_id == replica.shards[1].node_id


def test_sigterm_drains_in_flight_work_and_exits_0(server):
    stream = server.inference.Generate(chat("Write a short poem.", max_tokens=48), metadata=server.auth, timeout=120)
    first = next(stream)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert (rest or [first])[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED  # finished, not cut off
    assert server.proc.wait(60) == 0
    log = server.log_path.read_text()
    assert "draining the router" in log and "router drained" in log
