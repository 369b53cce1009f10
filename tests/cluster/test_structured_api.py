"""Structured output and tool calling through both doors, on a router over an in-process SmolLM2 engine:
response_format (JSON schema, any JSON, regex, grammar) over gRPC and the openai SDK; named and required
tool choice whose arguments validate; a tool round trip (call, result, answer) through the SDK, whole and
streamed; every bad constraint refused with its field named."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import openai
import pytest
from grpc_health.v1 import health_pb2

from caravan.v1 import inference_pb2 as pb
from cluster.api.tools import Tool, ToolSet, parse_calls, tool_messages
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.worker import ShardWorker
from tests.cluster.routerfixture import Clients, local_router

MODEL = "smollm2-135m-instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                           "parameters": TIME}}]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def served(smollm2_dir, tmp_path_factory):
    worker = ShardWorker(smollm2_dir, ParallelContext(Layout()), num_blocks=256, block_size=16, progress=False)
    rt = local_router(smollm2_dir, worker, tmp_path_factory.mktemp("structured"), 256, 16, max_in_flight=64)
    clients = Clients.of(rt.channel(), rt.router)
    clients.wait_health(health_pb2.HealthCheckResponse.SERVING)
    yield rt, clients, openai.OpenAI(base_url=f"http://127.0.0.1:{rt.router.http_port}/v1", api_key="none",
                                     max_retries=0)
    rt.close()


def generate(clients: Clients, **kw) -> tuple[str, list[pb.GenerateResponse]]:
    chat = kw.pop("chat", pb.Chat(messages=[pb.ChatMessage(role="user", content="Describe a person as JSON.")]))
    req = pb.GenerateRequest(chat=chat, max_tokens=kw.pop("max_tokens", 64),
                             sampling=pb.SamplingParams(temperature=0), **kw)
    responses = list(clients.inference.Generate(req, timeout=120))
    return "".join(r.text for r in responses), responses


def test_response_formats_over_grpc(served):
    _, c, _ = served
    text, rs = generate(c, response_format=pb.ResponseFormat(json_schema=json.dumps(PERSON)))
    jsonschema.validate(json.loads(text), PERSON)
    assert rs[-1].finish_reason == pb.FINISH_REASON_STOP
    text, _ = generate(c, response_format=pb.ResponseFormat(regex=r"[A-Z][a-z]+ is [0-9]{1,2}\."))
    assert re.fullmatch(r"[A-Z][a-z]+ is [0-9]{1,2}\.", text)
    text, _ = generate(c, response_format=pb.ResponseFormat(grammar='root ::= ("yes" | "no") "!"'))
    assert text in ("yes!", "no!")
    text, rs = generate(c, response_format=pb.ResponseFormat(json_schema=json.dumps(PERSON)), max_tokens=5)
    assert rs[-1].finish_reason == pb.FINISH_REASON_LENGTH and len(text) > 0   # a cut answer says so


@pytest.mark.parametrize("fmt, field, words", [
    (pb.ResponseFormat(json_schema="{nope"), "response_format.json_schema", "not valid JSON"),
    (pb.ResponseFormat(json_schema='{"type": "strin"}'), "response_format.json_schema", "not a valid JSON Schema"),
    (pb.ResponseFormat(json_schema='{"type": "array", "uniqueItems": true}'), "response_format.json_schema",
     "'uniqueItems' is not supported"),
    (pb.ResponseFormat(regex="(ab"), "response_format.regex", "does not compile"),
    (pb.ResponseFormat(grammar="root ::= missing"), "response_format.grammar", "is not defined"),
    (pb.ResponseFormat(), "response_format", "is empty"),
])
def test_bad_constraints_are_invalid_argument_naming_the_field(served, fmt, field, words):
    _, c, _ = served
    with pytest.raises(grpc.RpcError) as e:
        generate(c, response_format=fmt)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field + ":") and words in e.value.details(), e.value.details()


def test_bad_tool_requests_are_refused_naming_the_field(served):
    _, c, sdk = served
    tools = [pb.Tool(name="get_weather", parameters=json.dumps(WEATHER))]
    ask = [pb.ChatMessage(**ASK[0])]
    for chat, field in [(pb.Chat(messages=ask, tools=tools, tool_choice=pb.ToolChoice(function="nope")),
                         "chat.tool_choice.function"),
                        (pb.Chat(messages=ask, tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
                         "chat.tool_choice.mode"),
                        (pb.Chat(messages=ask, tools=[pb.Tool(name="bad name!")]), "chat.tools[0].name"),
                        (pb.Chat(messages=ask, tools=[pb.Tool(name="f", parameters='{"oneOf": []}')],
                                 tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
                         "chat.tools[0].parameters")]:
        with pytest.raises(grpc.RpcError) as e:
            generate(c, chat=chat)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field + ":"), \
            e.value.details()
    for kw, param in [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                         "type": "object", "not": {}}}}}, "response_format.json_schema.schema"),
                      ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                       "tool_choice.function.name"),
                      ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
                        "tool_choice": "required"}, "tools[0].function.parameters")]:
        with pytest.raises(openai.BadRequestError) as e:
            sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, **kw)
        assert e.value.body["param"] == param, e.value.body


def test_json_schema_and_json_object_through_the_sdk(served):
    _, _, sdk = served
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for stream in (False, True):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "A person as JSON."}], max_tokens=64,
                  temperature=0, response_format=fmt)
        if stream:
            text = "".join(ch.choices[0].delta.content or "" for ch in sdk.chat.completions.create(stream=True, **kw))
        else:
            text = sdk.chat.completions.create(**kw).choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)
    answer = sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80, temperature=0,
                                         response_format={"type": "json_object"})
    assert answer.choices[0].finish_reason == "length" or isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_validate_against_their_tool(served, choice):
    _, _, sdk = served
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):
        answer = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                             max_tokens=64, temperature=0.8, seed=seed)
        c = answer.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        (call,) = c.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        if isinstance(choice, dict):
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_tool_round_trip_through_the_sdk_whole_and_streamed(served):
    _, _, sdk = served
    first = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=64, temperature=0,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id,
                      "content": json.dumps({"city": args["city"], "temperature": 21, "unit": args["unit"]})}]
    final = sdk.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                        max_tokens=48, temperature=0)
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    # Streamed, a forced call arrives as one delta with the whole call; the SDK's chunks carry it.
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=64, temperature=0,
                                              tool_choice="required", stream=True))
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or ()]
    assert len(deltas) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert json.loads(deltas[0].function.arguments) and deltas[0].id.startswith("call_")


def test_llama31_calls_parse_json_and_python_tag_forms():
    ts = ToolSet((Tool("get_weather", "", WEATHER), Tool("get_time", "", TIME)), "auto")
    one = parse_calls('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', ts)
    assert [(c.name, json.loads(c.arguments)) for c in one] == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    two = parse_calls('<|python_tag|>{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}; '
                      '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}', ts)
    assert [c.name for c in two] == ["get_time", "get_weather"] and two[0].id != two[1].id
    for text in ("Paris is sunny.", '{"name": "unknown", "parameters": {}}', '{"name": "get_time"}', "{broken"):
        assert parse_calls(text, ts) == []
    # The prompt, for a template without tools (Llama 3's, ChatML): the functions go into the first
    # user turn, a call back as its JSON, a result as an ipython turn.
    msgs = tool_messages([ASK[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "A/B"}'}}]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}], ts, llama_headers=True)
    assert msgs[0]["content"].startswith("Given the following functions") and '"get_weather"' in msgs[0]["content"]
    assert json.loads(msgs[1]["content"]) == {"name": "get_time", "parameters": {"timezone": "A/B"}}
    assert msgs[2] == {"role": "ipython", "content": "12:00"}
