"""Tool calling, Llama 3.1's way: the tools go into the prompt, the model answers a call as JSON
(`{"name": ..., "parameters": {...}}`, possibly after `<|python_tag|>`), and the router turns that
text into `tool_calls`.

The prompt. A checkpoint whose own chat template takes `tools` (the Llama 3.1 Instruct
checkpoints' `tokenizer_config.json` does) gets them through that template, with assistant calls
and tool results as its messages. A template without tools (the Llama 3 template of the tokenizer
fixture, SmolLM2's ChatML) gets the same prompt Meta's 3.1 template writes, built here: the
function list and the JSON answer format at the start of the first user turn, an assistant call
as its JSON, a tool result as an `ipython` turn (Llama's header) or a `tool` turn (other templates).

Enforcement. `tool_choice: required` or a named function compile to a JSON schema over the calls
(`call_schema`), so the arguments always validate against the tool's parameters; `auto` is free
text that is parsed after the fact; `none` still describes the tools but parses nothing.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

MAX_TOOLS = 128
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
PYTHON_TAG = "<|python_tag|>"
# The words of Meta's Llama 3.1 JSON tool-calling prompt (its model card's "JSON based tool calling").
INSTRUCTION = ("Given the following functions, please respond with a JSON for a function call with its proper "
               "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
               "\"parameters\": dictionary of argument name and its value}. Do not use variables.\n\n")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict


@dataclass(frozen=True)
class ToolSet:
    tools: tuple[Tool, ...]
    choice: str                    # "auto", "none", "required", or "function"
    function: str | None = None    # with choice "function": its name

    @property
    def parses(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def by_name(self) -> dict[str, Tool]:
        return {t.name: t for t in self.tools}


@dataclass
class ToolCall:
    name: str
    arguments: str                 # a JSON object, as text
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))


def call_schema(ts: ToolSet) -> dict | None:
    """The JSON schema a constrained call must match (required or named), or None (auto, none)."""
    if ts.choice not in ("required", "function"):
        return None
    tools = [t for t in ts.tools if ts.choice == "required" or t.name == ts.function]
    one = [{"type": "object", "properties": {"name": {"const": t.name}, "parameters": t.parameters},
            "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    return one[0] if len(one) == 1 else {"anyOf": one}


def template_takes_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tool_messages(messages: list[dict], ts: ToolSet | None, llama_headers: bool) -> list[dict]:
    """The conversation with tools written into it, for a template that does not take tools itself:
    calls as their JSON, results as `ipython` (Llama headers) or `tool` turns, and the function list
    with Meta's instruction at the start of the first user turn."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["content"] = "; ".join(json.dumps({"name": c["function"]["name"],
                                                 "parameters": json.loads(c["function"]["arguments"] or "{}")})
                                     for c in m.pop("tool_calls"))
        if m["role"] == "tool":
            m = {"role": "ipython" if llama_headers else "tool", "content": m["content"]}
        m.pop("tool_call_id", None)
        out.append(m)
    if ts is not None and ts.tools:
        first = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
        listing = "\n\n".join(json.dumps(_function(t), indent=4) for t in ts.tools)
        text = INSTRUCTION + listing + "\n\n"
        if first is None:
            out.insert(0, {"role": "user", "content": text})
        else:
            out[first] = {**out[first], "content": text + out[first]["content"]}
    return out


def template_tools(ts: ToolSet | None) -> list[dict] | None:
    """The tools as a template that takes them expects (OpenAI's shape)."""
    return [_function(t) for t in ts.tools] if ts is not None and ts.tools else None


def _function(t: Tool) -> dict:
    return {"type": "function", "function": {"name": t.name, "description": t.description,
                                             "parameters": t.parameters}}


def parse_calls(text: str, ts: ToolSet) -> list[ToolCall]:
    """The calls in a whole answer: one JSON object, or several separated by ';', each naming a tool
    of the request with `parameters` (or `arguments`) an object; [] when the answer is anything
    else (plain text, or JSON that is not a call of these tools)."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return []
    known, calls = ts.by_name(), []
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return []
        args = obj.get("parameters", obj.get("arguments")) if isinstance(obj, dict) else None
        if not isinstance(args, dict) or obj.get("name") not in known:
            return []
        calls.append(ToolCall(obj["name"], json.dumps(args)))
        pos = end
        while pos < len(body) and body[pos] in " \n\t;":
            pos += 1
    return calls


def might_be_call(text: str) -> bool:
    """Whether the start of an answer could still become a call: its text is held back from a
    stream until the answer ends, then sent as a call or as text."""
    head = text.lstrip()
    return head == "" or head.startswith("{") or PYTHON_TAG.startswith(head[:len(PYTHON_TAG)]) \
        or head.startswith(PYTHON_TAG)
