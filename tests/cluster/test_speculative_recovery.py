"""Speculative decoding across a repair: `caravan serve` with the embedded default (SmolLM2 at TP 3 x
PP 2) and speculation on (n-gram lookup, or a draft model beside the first shard), two answers that copy their prompt (so drafts are long and mostly
accepted), greedy and seeded, streamed at once; one shard process is killed mid-answer. The router
resumes each on the repaired replica with the tokens already streamed, the replica speculates again
from them, and each client sees one stream, token for token the undisturbed run's."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import psutil
import pytest
from grpc_health.v1 import health_pb2

from caravan.v1 import inference_pb2 as pb
from cluster.runtime.ports import free_port
from tests.cluster.routerfixture import caravan_serve

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
TOKEN = "test-token-7f3b"
KILL_AFTER = 12    # tokens streamed before the kill: well inside the answer
PASSAGE = ("The lighthouse keeper climbed the stairs at dusk, lit the lamp, and wrote the weather in his log. "
           "Ships passed the point all night, and none of them ran aground on the rocks below.")
SAMPLING = {"greedy": pb.SamplingParams(temperature=0), "seeded": pb.SamplingParams(temperature=0.7, seed=41)}
RESUMED = r"request failed after (\d+) tokens .*; resuming"


@pytest.fixture(scope="module", params=["ngram", "draft"])
def server(request, tmp_path_factory, smollm2_dir):
    """n-gram lookup, or a draft model: SmolLM2 itself, the one trained model here (a draft that is the
    target is accepted nearly always: what is tested is the draft's cache across the repair)."""
    port = free_port()
    spec = ("speculative: {method: ngram}\n" if request.param == "ngram" else
            f"speculative: {{method: draft, draft_model: {smollm2_dir}}}\n")
    with caravan_serve(tmp_path_factory.mktemp("speculative-recovery"), spec, TOKEN, metrics_port=port) as clients:
        clients.metrics, clients.method = f"http://127.0.0.1:{port}/metrics", request.param
        yield clients


def request(sampling: pb.SamplingParams) -> pb.GenerateRequest:
    ask = f"Repeat this text exactly, word for word:\n\n{PASSAGE}"
    return pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=ask)]),
                              sampling=sampling, max_tokens=60)


def shard_processes(server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if " ".join(p.cmdline()).startswith("ray::ShardActor")]


def run_both(server, kill_after: int | None = None) -> dict[str, tuple[list[int], int]]:
    """Each request's token ids and finish reason, streamed at the same time (both speculate: the lane
    runs fewer than max_batch sequences); with `kill_after`, one shard process is killed once each
    stream has that many tokens."""
    tokens: dict[str, list[int]] = {name: [] for name in SAMPLING}
    finish: dict[str, int] = {}

    def one(name: str) -> None:
        for r in server.inference.Generate(request(SAMPLING[name]), metadata=server.auth, timeout=120):
            tokens[name] += r.token_ids
            finish[name] = r.finish_reason or finish.get(name, pb.FINISH_REASON_UNSPECIFIED)

    threads = [threading.Thread(target=one, args=(name,), daemon=True) for name in SAMPLING]
    for t in threads:
        t.start()
    if kill_after is not None:
        while min(len(t) for t in tokens.values()) < kill_after:
            assert all(t.is_alive() for t in threads), "a stream ended before the kill"
            time.sleep(0.005)
        shards = shard_processes(server)
        assert len(shards) == 6, [p.cmdline() for p in shards]
        if server.method == "draft":
            # The draft sits beside rank 0 only: that process holds a whole SmolLM2 (540 MB in fp32) more.
            shards.sort(key=lambda p: p.memory_info().rss)
            assert shards[-1].memory_info().rss - shards[-2].memory_info().rss > 300e6
            shards[-1].kill()
        else:
            shards[4].kill()
    for t in threads:
        t.join(120)
    return {name: (tokens[name], finish[name]) for name in SAMPLING}


def accepted_drafts(server) -> float:
    """caravan_speculative_accepted_tokens_total over the replicas, as the router last heard."""
    text = urllib.request.urlopen(server.metrics, timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r"^caravan_speculative_accepted_tokens_total\{.*\} (\S+)$", text, re.M))


def test_speculating_streams_resume_exactly_after_a_shard_is_killed(server):
    server.wait_health(SERVING, timeout_s=60)
    whole = run_both(server)
    assert all(len(ids) > 2 * KILL_AFTER for ids, _ in whole.values()), whole
    deadline = time.monotonic() + 10  # the router hears the replica's counters with its health checks
    while accepted_drafts(server) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert accepted_drafts(server) > 0, "the answers copy their prompt, yet no draft was accepted"
    resumes = len(re.findall(RESUMED, server.log_path.read_text()))
    start = time.monotonic()
    resumed = run_both(server, kill_after=KILL_AFTER)
    took = time.monotonic() - start
    cuts = [int(n) for n in re.findall(RESUMED, server.log_path.read_text())][resumes:]
    print(f"{ {k: len(ids) for k, (ids, _) in whole.items()} } tokens; a shard killed after {KILL_AFTER} each, "
          f"resumed after {cuts} streamed, {took:.1f} s in all")
    shortest = min(len(ids) for ids, _ in whole.values())
    assert len(cuts) == 2 and all(0 < n < shortest for n in cuts)  # both cut mid-answer, resumed
    assert resumed == whole
    server.wait_health(SERVING, timeout_s=60)
    server.wait_all_blocks_free(timeout_s=10)
