"""What a session has ingested, as messages and text, and how an incoming conversation extends it.

Agent frameworks send the whole conversation on every call. The session keeps the messages it has ingested and the
exact chat-template text they rendered to; an incoming list that starts with those messages, and whose rendering
starts with that text, only needs the text after it prefilled.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from jinja2 import TemplateError

from .tools import normalize_tools, write_tools_into_messages

_PROBE_NAME = "sirllm_probe_tool"

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, Any]


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[Message]:
    """Validate OpenAI-style messages and return plain copies holding only what the chat template reads."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or len(messages) == 0:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if content is None and role == "assistant" and tool_calls:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}): content must be a string, got {type(content).__name__}")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise ValueError(f"messages[{i}] ({role}): tool_calls must be a list, got {type(tool_calls).__name__}")
        plain: Message = {"role": role, "content": content}
        if tool_calls:
            plain["tool_calls"] = [_tool_call(i, j, call) for j, call in enumerate(tool_calls)]
        for key in ("tool_call_id", "name"):
            if message.get(key) is not None:
                plain[key] = message[key]
        normalized.append(plain)
    return normalized


def _tool_call(i: int, j: int, call: Any) -> dict[str, Any]:
    """A call in the one form the session keeps: ``{"id", "type": "function", "function": {"name", "arguments"}}``
    with the arguments as a dict (OpenAI sends them as a JSON string)."""
    function = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(f"messages[{i}].tool_calls[{j}] must name a function: {{'function': {{'name': ..., ...}}}}")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as error:
            raise ValueError(f"messages[{i}].tool_calls[{j}]: arguments are not JSON: {error}") from None
    if not isinstance(arguments, Mapping):
        raise ValueError(f"messages[{i}].tool_calls[{j}]: arguments must be a JSON object")
    try:
        json.dumps(arguments)
    except (TypeError, ValueError) as error:
        raise ValueError(f"messages[{i}].tool_calls[{j}]: arguments are not JSON data: {error}") from None
    converted = {
        "type": "function",
        "function": {"name": function["name"], "arguments": copy.deepcopy(dict(arguments))},
    }
    if call.get("id") is not None:
        converted = {"id": str(call["id"]), **converted}
    return converted


def same_message(incoming: Message, known: Message) -> bool:
    """Whether ``incoming`` is ``known`` as a framework sends it back: equal, or an assistant reply whose text
    differs only by surrounding whitespace (some chat engines strip it) and whose calls name the same tools with the
    same arguments."""
    if incoming == known:
        return True
    if incoming["role"] != "assistant" or known["role"] != "assistant":
        return False

    def calls(message: Message) -> list:
        return [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]

    return incoming["content"].strip() == known["content"].strip() and calls(incoming) == calls(known)


def starts_with(messages: list[Message], known: list[Message]) -> bool:
    """Whether ``messages`` begin with ``known`` (see :func:`same_message`)."""
    return len(known) <= len(messages) and all(same_message(m, k) for m, k in zip(messages, known))


class ChatTemplate:
    """Renders messages to text with the tokenizer's chat template (or one given by the caller).

    Tools are rendered by the template when it knows how (Qwen2.5, Llama 3.1, ...); for one that ignores them
    (SmolLM2's), they are described in the system message and earlier calls are written into their messages'
    content, in the format of :mod:`sirllm_agents.tools`. Either way the rendering depends only on the messages and
    tools, so a growing conversation keeps extending its own earlier rendering."""

    def __init__(self, tokenizer, template: str | None = None):
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat template; "
                "pass chat_template=... (a Jinja string) or use an instruct/chat checkpoint"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.source: str = template or tokenizer.chat_template

    def render(self, messages: list[Message], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        messages, tools = self.prepare(messages, tools)
        return self._apply(messages, add_generation_prompt, tools)

    def prepare(self, messages: list[Message], tools: list[dict] | None) -> tuple[list[Message], list[dict] | None]:
        """The messages and tools as the template is given them: unchanged (tools normalized) when it renders
        tools, else with the tools in the system message, calls written into content, and no tools."""
        specs = normalize_tools(tools) if tools else None
        if self.renders_tools:
            return [dict(m) for m in messages], specs
        return write_tools_into_messages(messages, specs), None

    @cached_property
    def renders_tools(self) -> bool:
        """Whether the template writes tool definitions into the prompt (probed once)."""
        probe = [{"type": "function", "function": {"name": _PROBE_NAME, "parameters": {"type": "object"}}}]
        try:
            text = self._apply([{"role": "user", "content": "hi"}], True, probe)
        except ValueError:
            return False
        return _PROBE_NAME in text

    def _apply(self, messages: list[Message], add_generation_prompt: bool, tools: list[dict] | None) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except TemplateError as error:
            raise ValueError(f"the chat template rejected these messages: {error}") from error


@dataclass
class Segment:
    """New text to prefill and the indices of the messages it renders (none for the generation prompt)."""

    text: str
    messages: range


@dataclass
class Transcript:
    """The messages a session has ingested, the text they render to, and each message's token span."""

    messages: list[Message] = field(default_factory=list)
    tools: list[dict] | None = None  # tool schemas the template rendered (they change the rendered text)
    text: str = ""
    length: int = 0  # tokens ingested, counted over the whole conversation (eviction does not lower it)
    spans: list[tuple[int, int]] = field(default_factory=list)

    def recognise(self, messages: list[Message]) -> list[Message]:
        """``messages`` with each one this transcript holds, as a framework sends it back (see :func:`same_message`),
        replaced by the transcript's own: the session then knows its earlier replies whatever form they come in."""
        known = self.messages
        return [known[i] if i < len(known) and same_message(m, known[i]) else m for i, m in enumerate(messages)]

    def plan(self, messages: list[Message], template: ChatTemplate, tools: list[dict] | None) -> list[Segment] | None:
        """The text that ``messages`` (rendered with ``tools``) add to this transcript, ending with the generation
        prompt, or None when they do not extend it (an earlier message changed or went, the tools changed, or the
        template rewrote earlier text)."""
        known = len(self.messages)
        if messages[:known] != self.messages or (known and tools != self.tools):
            return None
        segments = self._message_segments(messages, template, tools)
        if segments is None:
            return None
        rendered = self.text + "".join(s.text for s in segments)
        prompt = template.render(messages, add_generation_prompt=True, tools=tools)
        if not prompt.startswith(rendered):
            return None
        return segments + [Segment(prompt[len(rendered) :], range(0))]

    def _message_segments(
        self, messages: list[Message], template: ChatTemplate, tools: list[dict] | None
    ) -> list[Segment] | None:
        known = len(self.messages)
        segments, rendered = [], self.text
        for end in range(known + 1, len(messages) + 1):
            text = template.render(messages[:end], add_generation_prompt=False, tools=tools)
            if not text.startswith(rendered):
                break
            segments.append(Segment(text[len(rendered) :], range(end - 1, end)))
            rendered = text
        else:
            return segments
        # Some templates render a message differently once another follows it (grouped tool results): take the new
        # messages as one span then.
        text = template.render(messages, add_generation_prompt=False, tools=tools)
        if not text.startswith(self.text):
            return None
        return [Segment(text[len(self.text) :], range(known, len(messages)))]
