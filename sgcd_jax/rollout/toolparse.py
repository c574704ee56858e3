"""Hermes tool-call parsing: assistant text → AgentAction + the errors the agent must be told about.

Format (Qwen2.5/Qwen3/Hermes templates):
    free text <tool_call>
    {"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}
    </tool_call>
Several calls may follow each other. Everything outside the blocks (minus `<think>…</think>`) is the
message content for the user. A call is rejected — and an error observation is produced instead of
calling the env — when its JSON is malformed, it has no name, names an unknown tool, or its arguments
do not match the tool's JSON schema (missing required, wrong type, not in enum, unexpected key when
the schema says additionalProperties: false). Parsing is bounded: a block longer than
``MAX_CALL_CHARS`` or nested deeper than ``MAX_CALL_DEPTH`` (a policy can emit 1,000 ``[`` in ~500
tokens; Python's json recursion would raise) is rejected as ``oversized_call`` without being parsed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from sgcd_jax.envs.base import AgentAction, ToolCall

MAX_CALL_CHARS = 65_536  # one tool call's JSON text
MAX_CALL_DEPTH = 64  # nested [ / { levels in one tool call (tool schemas use a handful)

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)


PARSE_ERROR_KINDS = ("malformed_json", "oversized_call", "unknown_tool", "bad_arguments")  # engine metric keys


@dataclasses.dataclass(frozen=True)
class CallError:
    kind: str  # one of PARSE_ERROR_KINDS
    message: str  # shown to the agent as a tool observation
    name: str = ""  # the tool name if it could be read


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    action: AgentAction  # content + the valid tool calls only
    errors: tuple[CallError, ...] = ()
    num_calls: int = 0  # tool_call blocks seen, valid or not

    def error_observations(self) -> list[dict[str, Any]]:
        """Tool-role messages telling the agent what was wrong with its rejected calls."""
        return [{"role": "tool", "name": e.name, "content": e.message} for e in self.errors]


def tool_schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name → JSON schema of the arguments, from OpenAI/HF `tools=` specs (wrapped or bare)."""
    schemas = {}
    for spec in tools:
        fn = spec.get("function", spec)
        schemas[fn["name"]] = fn.get("parameters") or {"type": "object", "properties": {}}
    return schemas


def parse_tool_calls(text: str, tools: list[dict[str, Any]] | None) -> ParsedTurn:
    """Parse one assistant turn. `tools=None` skips name/argument validation."""
    schemas = None if tools is None else tool_schemas(tools)
    calls: list[ToolCall] = []
    errors: list[CallError] = []
    blocks = TOOL_CALL_RE.findall(text)
    for index, block in enumerate(blocks):
        call, error = _parse_block(block.strip(), schemas, call_id=f"call_{index}")
        if error is not None:
            errors.append(error)
        else:
            calls.append(call)
    content = TOOL_CALL_RE.sub("", THINK_RE.sub("", text)).strip()
    return ParsedTurn(AgentAction(content=content, tool_calls=tuple(calls)), tuple(errors), len(blocks))


def _parse_block(block: str, schemas: dict[str, Any] | None,
                 call_id: str) -> tuple[ToolCall | None, CallError | None]:
    depth = _nesting_depth(block) if len(block) <= MAX_CALL_CHARS else 0
    if len(block) > MAX_CALL_CHARS or depth > MAX_CALL_DEPTH:
        what = f"{len(block)} characters" if len(block) > MAX_CALL_CHARS else f"nested {depth} levels deep"
        return None, CallError("oversized_call", f"Error: tool call rejected: its JSON is {what} (limits: "
                                                 f"{MAX_CALL_CHARS} characters, {MAX_CALL_DEPTH} levels). Write "
                                                 'one flat JSON object {"name": ..., "arguments": {...}}.')
    try:
        payload = json.loads(block)
    except RecursionError:  # belt and braces: the depth scan bounds this already
        return None, CallError("oversized_call", "Error: tool call rejected: its JSON is nested too deeply.")
    except json.JSONDecodeError as exc:
        return None, CallError("malformed_json", f"Error: could not parse tool call JSON ({exc.msg} at char "
                                                 f"{exc.pos}). Write exactly one JSON object "
                                                 '{"name": ..., "arguments": {...}} inside <tool_call></tool_call>.')
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None, CallError("malformed_json", 'Error: a tool call must be a JSON object with a string "name" '
                                                 'and an "arguments" object.')
    name = payload["name"]
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):  # some models emit arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return None, CallError("bad_arguments", f"Error: arguments of {name!r} must be a JSON object, "
                                                f"got {type(arguments).__name__}.", name)
    if schemas is not None:
        if name not in schemas:
            return None, CallError("unknown_tool", f"Error: unknown tool {name!r}. Available tools: "
                                                   f"{', '.join(sorted(schemas))}.", name)
        problems = schema_errors(arguments, schemas[name], path="arguments")
        if problems:
            return None, CallError("bad_arguments", f"Error: invalid arguments for {name!r}: "
                                                    + "; ".join(problems), name)
    return ToolCall(name=name, arguments=arguments, call_id=call_id), None


def _nesting_depth(text: str) -> int:
    """Deepest [ / { nesting outside JSON strings (a linear scan; no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


_JSON_TYPES = {
    "string": lambda x: isinstance(x, str),
    "integer": lambda x: isinstance(x, int) and not isinstance(x, bool),
    "number": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
    "boolean": lambda x: isinstance(x, bool),
    "array": lambda x: isinstance(x, list),
    "object": lambda x: isinstance(x, dict),
    "null": lambda x: x is None,
}


def schema_errors(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """The subset of JSON Schema tool specs use: type (or list of types), enum, required, properties,
    additionalProperties: false, items, anyOf/oneOf. Returns human-readable problems ([] = valid)."""
    if not schema:
        return []
    for key in ("anyOf", "oneOf"):
        if key in schema:
            if not any(not schema_errors(value, option, path) for option in schema[key]):
                return [f"{path} matches none of the allowed forms"]
    expected = schema.get("type")
    if expected is not None:
        types = expected if isinstance(expected, list) else [expected]
        if not any(_JSON_TYPES.get(t, lambda _: True)(value) for t in types):
            return [f"{path} should be {' or '.join(types)}, got {_json_type_name(value)} {json.dumps(value)[:60]}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path} must be one of {schema['enum']}, got {json.dumps(value)[:60]}"]
    problems = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{path}.{key} is required")
        for key, item in value.items():
            if key in properties:
                problems += schema_errors(item, properties[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{path}.{key} is not a parameter (allowed: {', '.join(properties)})")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += schema_errors(item, schema["items"], f"{path}[{i}]")
    return problems


def _json_type_name(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](value):
            return name
    return type(value).__name__
