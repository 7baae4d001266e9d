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
    return [normalize_message(i, message) for i, message in enumerate(check_messages(messages))]


def check_messages(messages: Any) -> Sequence[Mapping[str, Any]]:
    """``messages`` if it is a non-empty list of messages (each one is checked by :func:`normalize_message`)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or len(messages) == 0:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    return messages


def normalize_message(i: int, message: Any) -> Message:
    """Message ``i`` of a conversation, validated, as a plain copy holding only what the chat template reads."""
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
    return plain


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


@dataclass
class Segment:
    """New text to prefill and the indices of the messages it renders (none for the generation prompt)."""

    text: str
    messages: range


class ChatTemplate:
    """Renders messages to text with the tokenizer's chat template (or one given by the caller).

    Tools are rendered by the template when it knows how (Qwen2.5, Llama 3.1, ...); for one that ignores them
    (SmolLM2's), they are described in the system message and earlier calls are written into their messages'
    content, in the format of :mod:`sirllm_agents.tools`. Either way the rendering depends only on the messages and
    tools, so a growing conversation keeps extending its own earlier rendering.

    What new messages add is rendered without the whole history before them wherever the template allows it (see
    :attr:`concatenates`): then a call costs the same at the 10th message and at the 10,000th."""

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

    def context(self, messages: list[Message], start: int) -> list[Message]:
        """The messages that stand for ``messages[:start]`` when rendering what follows them: all of them, or, for
        a template that :attr:`concatenates`, the first (system prompts are decided there) and the one or two just
        before ``start`` (a message may render after its predecessor's role), so that ``messages[start]`` keeps the
        parity of its index (templates that check roles alternate)."""
        return _context(messages, start) if self.concatenates else messages[:start]

    def continuation(
        self,
        messages: list[Message],
        start: int,
        add_generation_prompt: bool,
        tools: list[dict] | None,
        end: int | None = None,
    ) -> str | None:
        """The text that ``messages[start:end]`` (and the generation prompt) add to the rendering of
        ``messages[:start]``, or None when the template renders the earlier messages differently once these
        follow."""
        context = self.context(messages, start)
        before = self.render(context, False, tools) if context else ""
        text = self.render(context + messages[start:end], add_generation_prompt, tools)
        return text[len(before) :] if text.startswith(before) else None

    def segments(self, messages: list[Message], start: int, tools: list[dict] | None) -> list[Segment] | None:
        """What each of ``messages[start:]`` adds to the rendering of the messages before it. Where the template
        renders a message differently once another follows it (grouped tool results), the new messages are one
        segment; None when it renders ``messages[:start]`` differently once they follow."""
        segments = []
        for i in range(start, len(messages)):
            text = self.continuation(messages, i, False, tools, end=i + 1)
            if text is None:
                break
            segments.append(Segment(text, range(i, i + 1)))
        else:
            return segments
        text = self.continuation(messages, start, False, tools)
        return None if text is None else [Segment(text, range(start, len(messages)))]

    @cached_property
    def concatenates(self) -> bool:
        """Whether what new messages add renders the same from :meth:`context` as from the whole conversation.

        Probed once on a few conversations (with and without a system message, tool calls and grouped tool
        results): true for templates that render each message from itself, its neighbours and the first message
        (SmolLM2's is one). A template whose output depends on the whole conversation (one that counts messages, or
        numbers them) fails the probe, and every call renders it whole."""
        tool = {"type": "function", "function": {"name": _PROBE_NAME, "parameters": {"type": "object"}}}
        probed = False
        for conversation, tools in _probe_conversations(tool):
            try:
                # An empty conversation renders to nothing (transformers refuses to render one given a template).
                ends = range(1, len(conversation) + 1)
                whole = [""] + [self.render(conversation[:end], False, tools) for end in ends]
                prompts = [""] + [self.render(conversation[:end], True, tools) for end in ends]
            except ValueError:
                continue  # the template refuses this conversation (roles it does not take): try the next one
            probed = True
            for start in range(4, len(conversation)):
                context = _context(conversation, start)
                before = self.render(context, False, tools)
                for end in range(start + 1, len(conversation) + 1):
                    for full, generation in ((whole[end], False), (prompts[end], True)):
                        try:
                            part = self.render(context + conversation[start:end], generation, tools)
                        except ValueError:
                            return False
                        extends = full.startswith(whole[start])
                        if extends != part.startswith(before):
                            return False
                        if extends and full[len(whole[start]) :] != part[len(before) :]:
                            return False
        return probed

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


def _context(messages: list[Message], start: int) -> list[Message]:
    if start <= 3:
        return messages[:start]
    before = 1 if start % 2 == 0 else 2
    return messages[:1] + messages[start - before : start]


def _probe_conversations(tool: dict) -> list[tuple[list[Message], list[dict] | None]]:
    """Conversations that :attr:`ChatTemplate.concatenates` renders both ways: alternating turns with and without
    a system message, and an agent's tool loop with two results in a row."""

    def turn(role: str, n: int) -> Message:
        return {"role": role, "content": f"Probe {role} message {n}."}

    def call(n: int) -> Message:
        arguments = {"n": n}
        function = {"name": _PROBE_NAME, "arguments": arguments}
        return {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": f"c{n}", "type": "function", "function": function}],
        }

    def result(n: int) -> Message:
        return {"role": "tool", "content": f"Probe result {n}.", "tool_call_id": f"c{n}"}

    chat = [turn("user" if n % 2 == 0 else "assistant", n) for n in range(8)]
    agent = [turn("system", 0), turn("user", 1), call(2), result(2), turn("assistant", 3), turn("user", 4)]
    agent += [call(5), result(5), result(5), turn("assistant", 6), turn("user", 7), turn("assistant", 8)]
    return [([turn("system", 9), *chat], None), (chat, None), (agent, [tool])]


@dataclass
class Transcript:
    """The messages a session has ingested and each message's token span.

    ``raw`` holds each message as the caller last sent it, so a resent conversation is recognised by one
    comparison of lists (in C) rather than by checking every message again."""

    messages: list[Message] = field(default_factory=list)
    tools: list[dict] | None = None  # tool schemas the template rendered (they change the rendered text)
    length: int = 0  # tokens ingested, counted over the whole conversation (eviction does not lower it)
    spans: list[tuple[int, int]] = field(default_factory=list)
    template: ChatTemplate | None = field(default=None, compare=False, repr=False)
    raw: list[Any] = field(default_factory=list, compare=False, repr=False)

    @property
    def text(self) -> str:
        """The chat-template rendering of the messages: the text the session ingested (rendered on demand)."""
        if not self.messages or self.template is None:
            return ""
        return self.template.render(self.messages, add_generation_prompt=False, tools=self.tools)

    def recognise(self, incoming: Sequence[Mapping[str, Any]]) -> tuple[list[Message], list[Any]]:
        """``incoming`` (a whole conversation) as the session takes it, and as it was sent: each message this
        transcript holds, as a framework sends it back (see :func:`same_message`), replaced by the transcript's
        own, the rest checked and normalized. Costs one list comparison for the messages resent as they were last
        sent, plus the work of the new ones."""
        incoming = check_messages(incoming)
        held = min(len(self.messages), len(incoming))
        if list(incoming[:held]) == self.raw[:held]:
            messages, raw = self.messages[:held], self.raw[:held]
        else:
            messages, raw = [], []
            for i in range(held):
                message = incoming[i]
                if message == self.raw[i]:
                    messages.append(self.messages[i])
                    raw.append(self.raw[i])
                    continue
                normalized = normalize_message(i, message)
                messages.append(self.messages[i] if same_message(normalized, self.messages[i]) else normalized)
                raw.append(_snapshot(message))  # the form it comes in now: the next call matches it at once
        for i in range(held, len(incoming)):
            messages.append(normalize_message(i, incoming[i]))
            raw.append(_snapshot(incoming[i]))
        return messages, raw

    def holds(self, incoming: Sequence[Mapping[str, Any]]) -> bool:
        """Whether ``incoming`` starts with this transcript's messages (see :meth:`recognise`); changes nothing."""
        held = len(self.messages)
        if not held or len(incoming) < held:
            return False
        if list(incoming[:held]) == self.raw:
            return True
        try:
            return all(
                m == r or same_message(normalize_message(i, m), k)
                for i, (m, r, k) in enumerate(zip(incoming, self.raw, self.messages))
            )
        except ValueError:
            return False

    def plan(self, messages: list[Message], template: ChatTemplate, tools: list[dict] | None) -> list[Segment] | None:
        """The text that ``messages`` (rendered with ``tools``) add to this transcript, ending with the generation
        prompt, or None when they do not extend it (an earlier message changed or went, the tools changed, or the
        template rewrote earlier text). Renders only the new messages and their :meth:`ChatTemplate.context`."""
        known = len(self.messages)
        if messages[:known] != self.messages or (known and tools != self.tools):
            return None
        segments = template.segments(messages, known, tools)
        if segments is None:
            return None
        context = template.context(messages, known)
        rendered = template.render(context, False, tools) if context else ""
        rendered += "".join(s.text for s in segments)
        prompt = template.render(context + messages[known:], add_generation_prompt=True, tools=tools)
        if not prompt.startswith(rendered):
            return None
        return segments + [Segment(prompt[len(rendered) :], range(0))]


def _snapshot(message: Any) -> Any:
    """A copy of a message as sent, for comparing the next call's with it (nested values copied too, so a caller
    that edits its message in place is noticed)."""
    try:
        return copy.deepcopy(dict(message)) if isinstance(message, Mapping) else None
    except Exception:  # an uncopyable value: the message is then checked in full on every call
        return None
