"""Tool calling on any chat model: tool definitions in the prompt, calls parsed out of the reply.

A chat template that knows about tools (Qwen2.5, Llama 3.1, SmolLM3, ...) renders the tool definitions itself. For
one that does not (SmolLM2's ignores ``tools``), the definitions go into the system message in this format, which is
also the format a call is written in:

    You can call the following tools. Each is given as a JSON object with its name, description and parameters
    (a JSON schema).
    {"name": "get_weather", "description": "...", "parameters": {...}}

    To call a tool, reply with the call and nothing else, in this form:
    <tool_call>
    {"name": "<tool name>", "arguments": <the arguments as a JSON object>}
    </tool_call>
    When you do not need a tool, reply in plain text.

Earlier assistant messages carrying ``tool_calls`` are written into their content in the same form, so the model
sees its own calls the way it is asked to make them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)(?:" + re.escape(TOOL_CALL_END) + r"|\Z)", re.DOTALL)
_FENCE = re.compile(r"\A```(?:json)?\s*(.*?)\s*```\Z", re.DOTALL)


@dataclass
class ToolCall:
    """A call the model made: a fresh ``id``, the tool's ``name`` and its ``arguments``."""

    id: str
    name: str
    arguments: dict

    def as_message_call(self) -> dict[str, Any]:
        """The call as an assistant message's ``tool_calls`` entry (OpenAI's form, arguments as a dict)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def normalize_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Tool definitions in the OpenAI form chat templates expect: ``{"type": "function", "function": {...}}``.

    Accepts that form or a bare ``{"name", "description", "parameters"}`` dict."""
    normalized = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}] must be a dict with a 'name' (or {{'type': 'function', 'function': ...}})")
        spec = {"name": function["name"]}
        if function.get("description"):
            spec["description"] = function["description"]
        spec["parameters"] = dict(function.get("parameters") or {"type": "object", "properties": {}})
        normalized.append({"type": "function", "function": spec})
    names = [t["function"]["name"] for t in normalized]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, got {names}")
    return normalized


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in normalize_tools(tools)]


def tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt text that describes ``tools`` and how to call them (see the module docstring)."""
    lines = [
        "You can call the following tools. Each is given as a JSON object with its name, description and parameters "
        "(a JSON schema)."
    ]
    lines += [json.dumps(t["function"], ensure_ascii=False) for t in normalize_tools(tools)]
    lines += [
        "",
        "To call a tool, reply with the call and nothing else, in this form:",
        TOOL_CALL_START,
        '{"name": "<tool name>", "arguments": <the arguments as a JSON object>}',
        TOOL_CALL_END,
        "When you do not need a tool, reply in plain text.",
    ]
    return "\n".join(lines)


def format_tool_call(name: str, arguments: Mapping[str, Any] | str) -> str:
    """One call written the way the model is asked to write it (and the way constrained decoding writes it)."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    body = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}"


def write_tools_into_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict]:
    """For a chat template that ignores tools: ``messages`` with ``tools`` described in the system message (appended
    to the first one, or a new one in front) and each assistant message's ``tool_calls`` written into its content,
    the way the model is asked to write them. Deterministic, so a growing conversation keeps its earlier rendering."""
    prepared = [dict(m) for m in messages]
    for message in prepared:
        if message.get("role") == "assistant" and message.get("tool_calls"):
            calls = "\n".join(_format_message_call(call) for call in message.pop("tool_calls"))
            content = message.get("content") or ""
            message["content"] = f"{content}\n{calls}" if content else calls
    if tools:
        prompt = tools_prompt(tools)
        if prepared and prepared[0].get("role") == "system":
            prepared[0]["content"] = f"{prepared[0].get('content') or ''}\n\n{prompt}".lstrip("\n")
        else:
            prepared.insert(0, {"role": "system", "content": prompt})
    return prepared


def _format_message_call(call: Mapping[str, Any]) -> str:
    function = call.get("function", call)
    return format_tool_call(function["name"], function.get("arguments") or {})


def split_tool_calls(text: str, tools: Sequence[Mapping[str, Any]]) -> tuple[str, list[ToolCall]]:
    """``(content, calls)`` of a reply: the calls to known tools and the text around them (stripped).

    A reply with no valid call comes back unchanged with no calls; one invalid call among valid ones makes the whole
    reply plain text. Never raises."""
    try:
        names = set(tool_names(tools))
    except (ValueError, AttributeError, TypeError):
        return text, []
    blocks = list(_BLOCK.finditer(text))
    if blocks:
        bodies, outside = [b.group(1) for b in blocks], _outside(text, blocks)
    else:
        fenced = _FENCE.match(text.strip())
        bodies, outside = [fenced.group(1) if fenced else text], ""
    calls: list[ToolCall] = []
    for body in bodies:
        try:
            value = json.loads(body)
        except ValueError:
            return text, []
        for item in value if isinstance(value, list) else [value]:
            call = _as_call(item, names)
            if call is None:
                return text, []
            calls.append(call)
    if not calls:
        return text, []
    return outside.strip(), calls


def _outside(text: str, blocks: list[re.Match]) -> str:
    pieces, begin = [], 0
    for block in blocks:
        pieces.append(text[begin : block.start()])
        begin = block.end()
    pieces.append(text[begin:])
    return "".join(pieces)


def parse_tool_calls(text: str, tools: Sequence[Mapping[str, Any]]) -> list[ToolCall]:
    """The tool calls in a reply: ``<tool_call>`` blocks, or a reply that is nothing but a call (or a list of calls)
    as JSON, possibly in a code fence. Each must name one of ``tools`` and carry an arguments object. Never raises:
    a reply that is not a valid call gives ``[]``."""
    return split_tool_calls(text, tools)[1]


def _as_call(item: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=item["name"], arguments=arguments)
