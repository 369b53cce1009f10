"""The OpenAI-compatible API as a user meets it: `caravan serve` on the embedded default (a local Ray
cluster simulating 2 nodes, SmolLM2 at TP 3 x PP 2) in its own process, driven through the `openai`
SDK, its answers compared with the same server's gRPC ones. One server for the whole module."""

from __future__ import annotations

import asyncio

import openai
import pytest

from caravan.v1 import inference_pb2 as pb
from tests.cluster.routerfixture import caravan_serve

pytestmark = pytest.mark.slow

TOKEN = "test-token-openai"
MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with caravan_serve(tmp_path_factory.mktemp("openai-serve"), "", TOKEN, metrics_port=None) as clients:
        clients.sdk = openai.OpenAI(base_url=clients.http + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
        yield clients


def grpc_answer(server, request: pb.GenerateRequest) -> list[int]:
    return [t for r in server.inference.Generate(request, metadata=server.auth, timeout=120) for t in r.token_ids]


def test_greedy_answers_equal_grpc_token_for_token(server):
    ids = grpc_answer(server, pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(**QUESTION[0])]),
                                                 max_tokens=16, sampling=pb.SamplingParams(temperature=0)))
    text = server.inference.Detokenize(pb.DetokenizeRequest(token_ids=ids, skip_special_tokens=True),
                                       metadata=server.auth, timeout=10).text
    pieces = [server.inference.Detokenize(pb.DetokenizeRequest(token_ids=[t], skip_special_tokens=False),
                                          metadata=server.auth, timeout=10).text for t in ids]
    whole = server.sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0,
                                               logprobs=True)
    assert [t.token for t in whole.choices[0].logprobs.content] == pieces
    assert whole.choices[0].message.content == text and "Paris" in text
    assert whole.usage.completion_tokens == len(ids)

    streamed = list(server.sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == text
    assert streamed[-1].usage.completion_tokens == len(ids)

    async def completion() -> str:
        async with openai.AsyncOpenAI(base_url=server.http + "/v1", api_key=TOKEN, max_retries=0) as client:
            answer = await client.completions.create(model=MODEL, prompt="The llama is", max_tokens=8, temperature=0)
            return answer.choices[0].text
    prompt = list(server.inference.Tokenize(pb.TokenizeRequest(text="The llama is"), metadata=server.auth,
                                            timeout=10).token_ids)
    raw = grpc_answer(server, pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=8,
                                                 sampling=pb.SamplingParams(temperature=0)))
    want = server.inference.Detokenize(pb.DetokenizeRequest(token_ids=raw, skip_special_tokens=True),
                                       metadata=server.auth, timeout=10).text
    assert asyncio.run(completion()) == want


def test_n_seeds_logprobs_and_stop_strings(server):
    story = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story about a llama."}],
                 max_tokens=12, temperature=1.0, seed=11, n=2, logprobs=True, top_logprobs=2)
    first, again = (server.sdk.chat.completions.create(**story) for _ in range(2))
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content
    assert all(len(e.top_logprobs) == 2 for c in first.choices for e in c.logprobs.content)
    cut = server.sdk.completions.create(model=MODEL, prompt=["The capital of France is", "Paris is the capital of"],
                                        max_tokens=12, temperature=0, stop=[" "], n=1)
    assert all(" " not in c.text and c.finish_reason == "stop" for c in cut.choices)


def test_a_disconnecting_client_frees_its_kv_and_auth_is_on(server):
    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=server.http + "/v1", api_key=TOKEN, max_retries=0) as client:
            streams = await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Write a long essay about topic {i}."}],
                max_tokens=300, stream=True) for i in range(4)))
            for s in streams:
                await s.__anext__()
            for s in streams:
                await s.close()
    asyncio.run(run())
    server.wait_all_blocks_free(timeout_s=10)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.http + "/v1", api_key="wrong", max_retries=0).models.list()
