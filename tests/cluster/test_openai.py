"""The OpenAI-compatible HTTP API through the `openai` SDK, on a router over an in-process SmolLM2 engine:
answers equal to gRPC's, streaming, n, logprobs, stop strings, seeds, client disconnects freeing KV, and
every error in OpenAI's shape with its status. The same API through `caravan serve` is
`test_openai_serve.py`."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from grpc_health.v1 import health_pb2

from caravan.v1 import admin_pb2 as apb
from caravan.v1 import inference_pb2 as pb
from cluster.api.server import build_router
from cluster.config import ServeConfig
from cluster.runtime.ports import free_port
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.worker import ShardWorker
from tests.cluster.routerfixture import Clients, RouterThread, StubBackend, local_router

SERVING = health_pb2.HealthCheckResponse.SERVING
MODEL = "smollm2-135m-instruct"
NUM_BLOCKS, BLOCK = 512, 16
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(smollm2_dir, tmp_path_factory):
    worker = ShardWorker(smollm2_dir, ParallelContext(Layout()), num_blocks=NUM_BLOCKS, block_size=BLOCK,
                         progress=False)
    rt = local_router(smollm2_dir, worker, tmp_path_factory.mktemp("openai"), NUM_BLOCKS, BLOCK, max_in_flight=64)
    clients = Clients.of(rt.channel(), rt.router)
    clients.wait_health(SERVING)
    base = f"http://127.0.0.1:{rt.router.http_port}/v1"
    yield rt, clients, openai.OpenAI(base_url=base, api_key="none", max_retries=0), base
    rt.close()


def grpc_ids(clients: Clients, request: pb.GenerateRequest) -> list[int]:
    return [t for r in clients.inference.Generate(request, timeout=60) for t in r.token_ids]


def test_greedy_chat_equals_grpc_token_for_token_sync_async_and_streamed(served):
    rt, c, sdk, base = served
    ids = grpc_ids(c, pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(**QUESTION[0])]), max_tokens=24,
                                         sampling=pb.SamplingParams(temperature=0)))
    tokenizer = rt.router.inference.tokenizer
    want_tokens, want_text = [tokenizer.decode([t], False) for t in ids], tokenizer.decode(ids)

    whole = sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, logprobs=True)
    assert [t.token for t in whole.choices[0].logprobs.content] == want_tokens
    assert whole.choices[0].message.content == want_text and "Paris" in want_text
    assert whole.usage.completion_tokens == len(ids) and whole.usage.prompt_tokens > 10
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.model == MODEL

    async def async_answer() -> str:
        async with openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0) as client:
            answer = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=24,
                                                          temperature=0)
            return answer.choices[0].message.content
    assert asyncio.run(async_answer()) == want_text

    chunks = list(sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want_text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    assert len(chunks) > 5  # streamed token by token, not in one piece


def test_completions_take_text_lists_and_token_ids(served):
    rt, c, sdk, _ = served
    prompt_ids = list(c.inference.Tokenize(pb.TokenizeRequest(text="The llama is"), timeout=10).token_ids)
    ids = grpc_ids(c, pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), max_tokens=12,
                                         sampling=pb.SamplingParams(temperature=0)))
    want = rt.router.inference.tokenizer.decode(ids)
    one = sdk.completions.create(model=MODEL, prompt="The llama is", max_tokens=12, temperature=0)
    assert one.choices[0].text == want and one.object == "text_completion"
    several = sdk.completions.create(model=MODEL, prompt=["The llama is", prompt_ids], max_tokens=12, temperature=0,
                                     n=2, logprobs=3)
    assert [ch.index for ch in several.choices] == [0, 1, 2, 3]
    assert all(ch.text == want for ch in several.choices)
    lp = several.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert all(len(top) <= 3 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))
    assert several.usage.prompt_tokens == 2 * len(prompt_ids) and several.usage.completion_tokens == 4 * 12
    streamed = list(sdk.completions.create(model=MODEL, prompt="The llama is", max_tokens=12, temperature=0,
                                           stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "length"


def test_n_choices_stop_strings_top_logprobs_and_seeds(served):
    rt, c, sdk, _ = served
    story = [{"role": "user", "content": "Tell me a story about a llama."}]
    seeded = dict(model=MODEL, messages=story, max_tokens=16, temperature=1.0, seed=7, n=3)
    first = sdk.chat.completions.create(**seeded)
    again = sdk.chat.completions.create(**seeded)
    texts = [ch.message.content for ch in first.choices]
    assert texts == [ch.message.content for ch in again.choices]  # the same seed, the same answers
    assert len(set(texts)) > 1  # n choices, not n copies of one
    streamed = {}
    for chunk in sdk.chat.completions.create(**seeded, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts

    plain = sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in plain.choices[0].message.content
    cut = sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stop=["Paris"])
    assert cut.choices[0].message.content == plain.choices[0].message.content.split("Paris")[0]
    assert cut.choices[0].finish_reason == "stop"

    top = sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0, logprobs=True,
                                      top_logprobs=5)
    for entry in top.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 5 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0


def test_models_health_and_metrics_by_api(served):
    rt, c, sdk, base = served
    assert [m.id for m in sdk.models.list().data] == [MODEL]
    root = base.removesuffix("/v1")
    assert urllib.request.urlopen(root + "/health", timeout=5).status == 200
    sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=0)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{rt.router.metrics_port}/metrics", timeout=5).read().decode()
    for line in ('caravan_requests_total{api="http",code="200",method="completions"}',
                 'caravan_requests_total{api="http",code="400",method="completions"}',
                 'caravan_time_to_first_token_seconds_count{api="http"}'):
        assert line in metrics, line


def test_a_client_that_disconnects_frees_its_kv_blocks(served):
    rt, c, _, base = served

    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0) as client:
            streams = await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Write a long essay about topic {i}."}],
                max_tokens=400, temperature=0.8, seed=i, stream=True) for i in range(16)))
            for s in streams:
                await s.__anext__()  # every stream is under way...
            assert c.status().in_flight == 16
            for s in streams:
                await s.close()  # ...then every client goes away
            with pytest.raises(openai.APITimeoutError):  # a whole answer's client that gives up
                await client.with_options(timeout=1.0).chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Write a long essay."}], max_tokens=400)

    asyncio.run(run())
    c.wait_all_blocks_free(timeout_s=5)
    assert c.status().in_flight == 0


def test_request_errors_in_openai_shape(served):
    rt, c, sdk, base = served

    def error(status: int, call, param: str | None, code: str | None = None, contains: str = "") -> dict:
        with pytest.raises(openai.APIStatusError) as e:
            call()
        body = e.value.response.json()
        assert e.value.status_code == status and set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["param"] == param and contains in body["error"]["message"], body
        if code is not None:
            assert body["error"]["code"] == code, body
        return body["error"]

    chat = sdk.chat.completions.create
    error(400, lambda: chat(model=MODEL, messages=QUESTION, tools=[{"type": "function", "function": {"name": "f"}}],
                            tool_choice={"type": "function", "function": {"name": "g"}}),
          "tool_choice.function.name", contains="not one of the tools")
    error(400, lambda: chat(model=MODEL, messages=QUESTION, presence_penalty=0.5), "presence_penalty")
    error(400, lambda: chat(model=MODEL, messages=[{"role": "bot", "content": "hi"}]), "messages[0].role",
          contains="'bot' is not a role")
    error(400, lambda: chat(model=MODEL, messages=QUESTION, temperature=500), "temperature")
    error(400, lambda: chat(model=MODEL, messages=QUESTION, top_logprobs=3), "top_logprobs",
          contains="needs logprobs")
    error(400, lambda: chat(model=MODEL, messages=QUESTION, max_completion_tokens=10**6), "max_completion_tokens",
          contains="context window")
    error(400, lambda: chat(model=MODEL, messages=QUESTION, n=0), "n")
    error(400, lambda: chat(model=MODEL, messages=QUESTION, stop=["x"] * 17), "stop")
    error(400, lambda: sdk.completions.create(model=MODEL, prompt="Hi", logprobs=21), "logprobs")
    error(400, lambda: sdk.completions.create(model=MODEL, prompt=[[1, 2], [3, 10**6]]), "prompt[1][1]",
          contains="outside the vocabulary")
    error(400, lambda: sdk.post("/chat/completions", cast_to=object, body="not json"), "body", contains="JSON")
    error(404, lambda: chat(model="gpt-4o", messages=QUESTION), "model", "model_not_found")
    error(404, lambda: sdk.get("/nowhere", cast_to=object), None, "not_found")
    error(413, lambda: sdk.completions.create(model=MODEL, prompt=[1] * 9000), "prompt", "context_length_exceeded")
    error(413, lambda: chat(model=MODEL, messages=[{"role": "user", "content": "word " * 9000}]), "messages",
          "context_length_exceeded")


# ---- without an engine: auth, the queue, recovery, drain, failures ----

def stub_router(model_dir, tmp_path, backend, **router) -> RouterThread:
    config = ServeConfig.from_dict({"router": {"port": 0, "http_port": free_port(), "metrics_port": None, **router},
                                    "timeouts": {"health_check_period_s": 0.1, "step_s": 1}})

    async def make():
        r = build_router(config, str(model_dir), backend, default_token_file=tmp_path / "token")
        await r.start()
        return r
    return RouterThread(make)


def sdk_for(rt: RouterThread, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{rt.router.http_port}/v1", api_key=key, max_retries=0)


def test_api_keys_from_a_file_guard_everything_but_health(smollm2_dir, tmp_path):
    (tmp_path / "keys").write_text("# one key per line\nkey-one\n\nkey-two\n")
    backend = StubBackend(serving=True)
    backend.release.set()
    rt = stub_router(smollm2_dir, tmp_path, backend, api_keys_file=str(tmp_path / "keys"))
    try:
        for key in ("key-one", "key-two"):
            assert sdk_for(rt, key).completions.create(model=MODEL, prompt="Hi").choices[0].finish_reason == "length"
        for key in ("key-three", "key-one2", "key"):
            for call in (lambda s: s.models.list(), lambda s: s.completions.create(model=MODEL, prompt="Hi")):
                with pytest.raises(openai.AuthenticationError) as e:
                    call(sdk_for(rt, key))
                assert e.value.response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(urllib.error.HTTPError) as e:  # no Authorization header at all
            urllib.request.urlopen(f"http://127.0.0.1:{rt.router.http_port}/v1/models", timeout=5)
        assert e.value.code == 401 and b'"invalid_api_key"' in e.value.read()
        health = urllib.request.urlopen(f"http://127.0.0.1:{rt.router.http_port}/health", timeout=5)
        assert health.status == 200
    finally:
        rt.close()


def test_full_queue_is_429_with_retry_after_and_recovery_is_503(smollm2_dir, tmp_path):
    backend = StubBackend(serving=True)
    rt = stub_router(smollm2_dir, tmp_path, backend, max_in_flight=2, wait_for_replica_s=0.2)
    sdk = sdk_for(rt)
    try:
        holders = [threading.Thread(target=sdk.completions.create, kwargs=dict(model=MODEL, prompt="Hi", stream=True))
                   for _ in range(2)]
        for t in holders:
            t.start()
        while rt.router.in_flight < 2:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            sdk.chat.completions.create(model=MODEL, messages=QUESTION)
        assert e.value.response.headers["retry-after"] == "1"
        assert "router.max_in_flight=2" in e.value.response.json()["error"]["message"]
        backend.release.set()
        for t in holders:
            t.join(10)

        backend.reports = []  # no replica serves: requests wait router.wait_for_replica_s, then 503
        deadline = time.monotonic() + 5
        while rt.router.serving and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.InternalServerError) as e:
            sdk.chat.completions.create(model=MODEL, messages=QUESTION)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert "the cluster is recovering" in e.value.response.json()["error"]["message"]
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://127.0.0.1:{rt.router.http_port}/health", timeout=5)
        assert health.value.code == 503
        # The liveness question (the chart's probe over TLS): the router runs, whatever its replicas do.
        live = urllib.request.urlopen(f"http://127.0.0.1:{rt.router.http_port}/health?service=caravan.router", timeout=5)
        assert live.status == 200
        with pytest.raises(urllib.error.HTTPError) as unknown:
            urllib.request.urlopen(f"http://127.0.0.1:{rt.router.http_port}/health?service=caravan.nothing", timeout=5)
        assert unknown.value.code == 404
    finally:
        rt.close()


def test_draining_is_503_and_an_internal_failure_is_500(smollm2_dir, tmp_path):
    backend = StubBackend(serving=True, fail=ValueError("boom"))
    backend.release.set()
    rt = stub_router(smollm2_dir, tmp_path, backend)
    sdk = sdk_for(rt)
    try:
        Clients(rt.channel(), "").wait_health(SERVING, timeout_s=2)
        with pytest.raises(openai.InternalServerError) as e:
            sdk.completions.create(model=MODEL, prompt="Hi")
        error = e.value.response.json()["error"]
        assert e.value.status_code == 500 and error["type"] == "server_error"
        assert "boom" not in error["message"]  # the exception's text stays in the log

        clients = Clients.of(rt.channel(), rt.router)
        backend.fail, backend.release = None, threading.Event()
        in_flight = threading.Thread(target=sdk.completions.create, kwargs=dict(model=MODEL, prompt="Hi"))
        in_flight.start()
        while rt.router.in_flight == 0:
            time.sleep(0.01)
        clients.admin.Drain(apb.DrainRequest(grace_period_s=5), metadata=clients.admin_auth)
        clients.wait_health(health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=2)
        with pytest.raises(openai.InternalServerError) as e:
            sdk.chat.completions.create(model=MODEL, messages=QUESTION)
        assert e.value.status_code == 503 and "draining" in e.value.response.json()["error"]["message"]
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://127.0.0.1:{rt.router.http_port}/health", timeout=5)
        assert health.value.code == 503 and b"draining" in health.value.read()
        backend.release.set()
        in_flight.join(10)
        rt.call(rt.router.stopped.wait(), timeout_s=5)
    finally:
        rt.close()


def test_speculate_opt_out_reaches_the_engine_from_both_doors(smollm2_dir, tmp_path):
    """caravan.v1's speculate and the HTTP body's speculate set SamplingParams.speculate; unset is true."""
    seen = []

    class Recording(StubBackend):
        async def generate(self, prompt_ids, params):
            seen.append(params.speculate)
            async for update in super().generate(prompt_ids, params):
                yield update

    backend = Recording(serving=True)
    backend.release.set()
    rt = stub_router(smollm2_dir, tmp_path, backend)
    sdk, clients = sdk_for(rt), Clients.of(rt.channel(), rt.router)
    try:
        for flag in (None, False, True):
            req = pb.GenerateRequest(prompt="Hi", max_tokens=1, **({} if flag is None else {"speculate": flag}))
            list(clients.inference.Generate(req, metadata=clients.auth, timeout=10))
            extra = {} if flag is None else {"speculate": flag}
            sdk.completions.create(model=MODEL, prompt="Hi", extra_body=extra)
            sdk.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=extra)
        assert seen == [True] * 3 + [False] * 3 + [True] * 3
        with pytest.raises(openai.BadRequestError) as e:
            sdk.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"speculate": "no"})
        assert e.value.response.json()["error"]["param"] == "speculate"
        assert "must be a boolean" in e.value.response.json()["error"]["message"]
    finally:
        rt.close()
