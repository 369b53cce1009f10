"""A constrained stream through `caravan serve` (the embedded default: SmolLM2 at TP 3 x PP 2) whose
shard process is killed mid-answer: the router resumes it on the repaired replica with the tokens
already streamed, the replica's grammar state is rebuilt from them, and the client sees one stream,
token for token the undisturbed run's, that validates against its schema (greedy and seeded)."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import psutil
import pytest
from grpc_health.v1 import health_pb2

from caravan.v1 import inference_pb2 as pb
from tests.cluster.routerfixture import caravan_serve

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
TOKEN = "test-token-5c2a"
KILL_AFTER = 10    # tokens streamed before the kill: well inside the answer
# Long enough (about 70 tokens) to be cut in the middle, small enough for SmolLM2 to close.
SCHEMA = {"type": "array", "minItems": 3, "maxItems": 3, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "city": {"type": "string", "maxLength": 10}}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir):
    with caravan_serve(tmp_path_factory.mktemp("structured-recovery"), "", TOKEN, metrics_port=None) as clients:
        yield clients


def request(sampling: pb.SamplingParams) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="Three people as JSON.")]),
                              sampling=sampling, max_tokens=200,
                              response_format=pb.ResponseFormat(json_schema=json.dumps(SCHEMA)))


def shard_processes(server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if " ".join(p.cmdline()).startswith("ray::ShardActor")]


def stream(server, req: pb.GenerateRequest, kill_after: int | None = None) -> tuple[list[int], int]:
    """The stream's token ids and finish reason; with `kill_after`, one shard process is killed once
    that many tokens have arrived."""
    tokens, finish = [], pb.FINISH_REASON_UNSPECIFIED
    for r in server.inference.Generate(req, metadata=server.auth, timeout=120):
        tokens += r.token_ids
        finish = r.finish_reason or finish
        if kill_after is not None and len(tokens) >= kill_after:
            shards = shard_processes(server)
            assert len(shards) == 6, [p.cmdline() for p in shards]
            shards[4].kill()
            kill_after = None
    return tokens, finish


@pytest.mark.parametrize("sampling", [pb.SamplingParams(temperature=0), pb.SamplingParams(temperature=1.0, seed=29)],
                         ids=["greedy", "seeded"])
def test_a_constrained_stream_resumes_exactly_after_a_shard_is_killed(server, sampling):
    server.wait_health(SERVING, timeout_s=60)
    whole, finish = stream(server, request(sampling))
    assert finish == pb.FINISH_REASON_STOP and len(whole) > 2 * KILL_AFTER, len(whole)
    resumes = len(re.findall(r"request failed after \d+ tokens .*; resuming", server.log_path.read_text()))
    start = time.monotonic()
    resumed, resumed_finish = stream(server, request(sampling), kill_after=KILL_AFTER)
    took = time.monotonic() - start
    log = server.log_path.read_text()
    cuts = [int(n) for n in re.findall(r"request failed after (\d+) tokens .*; resuming", log)]
    print(f"{len(whole)} tokens; a shard killed after {KILL_AFTER}, resumed after {cuts[resumes:]} "
          f"streamed, {took:.1f} s in all")
    assert len(cuts) > resumes and all(0 < n < len(whole) for n in cuts[resumes:])  # cut mid-answer, resumed
    assert resumed == whole and resumed_finish == finish
    answer = server.inference.Detokenize(pb.DetokenizeRequest(token_ids=whole, skip_special_tokens=True),
                                         metadata=server.auth, timeout=10).text
    jsonschema.validate(json.loads(answer), SCHEMA)
    server.wait_health(SERVING, timeout_s=60)
    server.wait_all_blocks_free(timeout_s=10)
