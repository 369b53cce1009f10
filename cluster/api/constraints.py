"""The checks of a Generate request's output constraints: `response_format` and a chat's `tools`
and `tool_choice`, turned into what the engine runs (`Constraint`) and what the router parses
(`ToolSet`). Raises `FieldError(field, problem)`; `cluster.api.validate` turns it into
INVALID_ARGUMENT. Whether a schema, regex or grammar compiles is checked once the request is
admitted (`compile_check`, on a worker thread: a large schema takes a while)."""

from __future__ import annotations

import asyncio
import json

from caravan.v1 import inference_pb2 as pb
from cluster.api.tools import MAX_TOOLS, NAME, Tool, ToolSet, call_schema
from cluster.engine.grammar import MAX_SPEC_CHARS, Constraint, GrammarError, Grammars

_MODES = {pb.TOOL_CHOICE_MODE_UNSPECIFIED: "auto", pb.TOOL_CHOICE_MODE_AUTO: "auto",
          pb.TOOL_CHOICE_MODE_NONE: "none", pb.TOOL_CHOICE_MODE_REQUIRED: "required"}


class FieldError(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def check_output(req: pb.GenerateRequest) -> tuple[Constraint | None, ToolSet | None, str]:
    """(the constraint, the tools, the field the constraint came from)."""
    tools = check_tools(req.chat) if req.WhichOneof("input") == "chat" else None
    fmt = check_response_format(req)
    schema = call_schema(tools) if tools is not None else None
    if fmt is not None and schema is not None:
        raise FieldError("response_format", "cannot be combined with a tool_choice that forces a call (the call "
                                            "is the output's format); drop one of them")
    if (fmt is not None or schema is not None) and req.ignore_eos:
        raise FieldError("ignore_eos", "cannot be set with a constrained output: the output ends where the "
                                       "format is complete")
    if schema is not None:
        return Constraint("json_schema", json.dumps(schema)), tools, "chat.tool_choice"
    return fmt, tools, _FIELD.get(req.response_format.WhichOneof("format"), "response_format")


_FIELD = {k: f"response_format.{k}" for k in ("json_schema", "json_object", "regex", "grammar")}


def check_response_format(req: pb.GenerateRequest) -> Constraint | None:
    if not req.HasField("response_format"):
        return None
    rf = req.response_format
    which = rf.WhichOneof("format")
    if which is None:
        raise FieldError("response_format", "is empty; set one of json_schema, json_object, regex or grammar")
    if which == "json_object":
        if not rf.json_object:
            raise FieldError("response_format.json_object", "set it to true (or leave response_format unset)")
        return Constraint("json_object")
    spec = getattr(rf, which)
    if not spec.strip():
        raise FieldError(f"response_format.{which}", "is empty")
    if len(spec) > MAX_SPEC_CHARS:
        raise FieldError(f"response_format.{which}", f"is {len(spec):,} characters; at most {MAX_SPEC_CHARS:,}")
    return Constraint(which, spec)


def check_tools(chat: pb.Chat, field: str = "chat") -> ToolSet | None:
    has_choice = chat.HasField("tool_choice") and chat.tool_choice.WhichOneof("choice") is not None
    if not chat.tools:
        if has_choice and chat.tool_choice.WhichOneof("choice") == "function":
            raise FieldError(f"{field}.tool_choice.function", "names a function, but the chat has no tools")
        if has_choice and chat.tool_choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED:
            raise FieldError(f"{field}.tool_choice.mode", "is required, but the chat has no tools")
        return None
    if len(chat.tools) > MAX_TOOLS:
        raise FieldError(f"{field}.tools", f"has {len(chat.tools)} tools; at most {MAX_TOOLS} are accepted")
    tools = []
    for i, t in enumerate(chat.tools):
        where = f"{field}.tools[{i}]"
        if not NAME.fullmatch(t.name):
            raise FieldError(f"{where}.name", f"{t.name[:70]!r} is not a function name; use 1 to 64 of a-z, A-Z, "
                                              "0-9, _ and -")
        if any(t.name == u.name for u in tools):
            raise FieldError(f"{where}.name", f"{t.name!r} is already the name of another tool")
        try:
            params = json.loads(t.parameters) if t.parameters else {"type": "object"}
        except json.JSONDecodeError as e:
            raise FieldError(f"{where}.parameters", f"is not valid JSON: {e}") from None
        if not isinstance(params, dict):
            raise FieldError(f"{where}.parameters", "must be a JSON Schema object")
        tools.append(Tool(t.name, t.description, params))
    choice, function = "auto", None
    if has_choice:
        if chat.tool_choice.WhichOneof("choice") == "function":
            choice, function = "function", chat.tool_choice.function
            if function not in {t.name for t in tools}:
                raise FieldError(f"{field}.tool_choice.function", f"{function[:70]!r} is not one of the tools: "
                                 + ", ".join(t.name for t in tools))
        else:
            choice = _MODES.get(chat.tool_choice.mode)
            if choice is None:
                raise FieldError(f"{field}.tool_choice.mode", f"{chat.tool_choice.mode} is not a mode")
    return ToolSet(tuple(tools), choice, function)


async def compile_check(grammars: Grammars, constraint: Constraint, field: str, tools: ToolSet | None) -> None:
    """Compiles the constraint (cached: the replica finds it again in its own cache only if it runs
    in this process; each replica compiles once per distinct constraint), so that one that cannot
    compile is refused before it is queued. For a forced tool call, the error names the tool."""
    try:
        await asyncio.to_thread(grammars.compile, constraint)
    except GrammarError as e:
        if tools is not None and field == "chat.tool_choice":
            bad = _bad_tool(grammars, tools)
            if bad is not None:
                raise bad from None
        raise FieldError(field, str(e)) from None


def _bad_tool(grammars: Grammars, tools: ToolSet) -> FieldError | None:
    for i, t in enumerate(tools.tools):
        try:
            grammars.compile(Constraint("json_schema", json.dumps(t.parameters)))
        except GrammarError as e:
            return FieldError(f"chat.tools[{i}].parameters", str(e))
    return None
