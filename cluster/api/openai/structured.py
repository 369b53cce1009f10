"""OpenAI's structured-output and tool fields -> caravan.v1, and tool calls back.

In: `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"schema"}},
and, as this server's own, {"type": "regex", "regex"} and {"type": "grammar", "grammar"} (EBNF)),
`tools`, `tool_choice`, and messages with `tool_calls` (assistant) or `tool_call_id` (tool).
Out: a choice whose answer parses as calls of the request's tools has `tool_calls` and
finish_reason "tool_calls". A streamed choice that might be a call (it starts with `{` or
`<|python_tag|>`) is held back until it ends, then sent as one delta with the calls, or as text.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from caravan.v1 import inference_pb2 as pb
from cluster.api.inference import Chunk
from cluster.api.openai.errors import bad_field
from cluster.api.tools import ToolSet, might_be_call, parse_calls

_MODES = {"none": pb.TOOL_CHOICE_MODE_NONE, "auto": pb.TOOL_CHOICE_MODE_AUTO,
          "required": pb.TOOL_CHOICE_MODE_REQUIRED}
# caravan.v1 field -> where it is in an OpenAI body (`Parsed.rename`)
RENAMES = {"response_format.json_schema": "response_format.json_schema.schema",
           "chat.tool_choice.function": "tool_choice.function.name", "chat.tool_choice.mode": "tool_choice",
           "chat.tool_choice": "tool_choice"}


def rename(field: str) -> str | None:
    if field in RENAMES:
        return RENAMES[field]
    if field.startswith("chat.tools["):
        index, _, rest = field[len("chat.tools"):].partition("].")
        return f"tools{index}].function.{rest}"
    return None


def set_response_format(request: pb.GenerateRequest, body: dict) -> None:
    rf = body.get("response_format")
    if rf is None:
        return
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return
    out = request.response_format
    if kind == "json_object":
        out.json_object = True
    elif kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad_field("response_format.json_schema.schema", "is required: a JSON Schema object")
        out.json_schema = json.dumps(spec["schema"])
    elif kind in ("regex", "grammar") and isinstance(rf.get(kind), str):
        setattr(out, kind, rf[kind])
    else:
        raise bad_field("response_format", 'use {"type": "text" | "json_object" | "json_schema", "json_schema": '
                                           '{"name", "schema"}}, or {"type": "regex", "regex": ...}, or '
                                           '{"type": "grammar", "grammar": <EBNF>}')


def set_tools(chat: pb.Chat, body: dict) -> None:
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_field("tools", "must be a list of {type: function, function: {name, description, parameters}}")
    for i, t in enumerate(tools or ()):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_field(f"tools[{i}]", "must be {type: function, function: {name, description, parameters}}")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_field(f"tools[{i}].function.parameters", "must be a JSON Schema object")
        chat.tools.add(name=fn["name"], description=str(fn.get("description") or ""),
                       parameters=json.dumps(params) if params is not None else "")
    choice = body.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, str) and choice in _MODES:
        chat.tool_choice.mode = _MODES[choice]
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        chat.tool_choice.function = choice["function"]["name"]
    else:
        raise bad_field("tool_choice", 'use "none", "auto", "required" or {"type": "function", "function": {"name"}}')


def add_message(chat: pb.Chat, m: dict, where: str, content: str) -> None:
    """A message with its calls (assistant) or the call it answers (tool)."""
    msg = chat.messages.add(role=m.get("role") if isinstance(m.get("role"), str) else "", content=content)
    if m.get("tool_call_id") is not None:
        if not isinstance(m["tool_call_id"], str):
            raise bad_field(f"{where}.tool_call_id", "must be a string")
        msg.tool_call_id = m["tool_call_id"]
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise bad_field(f"{where}.tool_calls", "must be a list")
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments", ""), str):
            raise bad_field(f"{where}.tool_calls[{j}]", "must be {id, type: function, function: {name, arguments}}")
        msg.tool_calls.add(id=str(c.get("id") or ""), name=fn["name"], arguments=fn.get("arguments") or "{}")


def openai_calls(text: str, tools: ToolSet) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in parse_calls(text, tools)]


async def with_tool_calls(chunks: AsyncIterator[Chunk], tools: ToolSet | None) -> AsyncIterator[Chunk]:
    """A choice's chunks, with a call's text held back and its last chunk carrying `tool_calls`."""
    if tools is None or not tools.parses:
        async for c in chunks:
            yield c
        return
    held: list[Chunk] = []
    text = ""
    async for c in chunks:
        text += c.text
        if c.finish_reason is None and might_be_call(text):
            held.append(c)
            continue
        if c.finish_reason is not None:
            calls = openai_calls(text, tools)
            if calls:
                samples = [s for h in held for s in h.samples] + c.samples
                yield Chunk("", samples, "tool_calls", c.usage, tool_calls=calls)
                return
        if held:
            c = Chunk("".join(h.text for h in held) + c.text, [s for h in held for s in h.samples] + c.samples,
                      c.finish_reason, c.usage)
            held = []
        yield c


def message(text: str, calls: list[dict] | None) -> dict[str, Any]:
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}
    return {"role": "assistant", "content": text}
