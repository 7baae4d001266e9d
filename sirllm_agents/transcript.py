"""What a session has ingested, as messages and text, and how an incoming conversation extends it.

Agent frameworks send the whole conversation on every call. The session keeps the messages it has ingested and the
exact chat-template text they rendered to; an incoming list that starts with those messages, and whose rendering
starts with that text, only needs the text after it prefilled.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

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
            plain["tool_calls"] = copy.deepcopy(tool_calls)
        for key in ("tool_call_id", "name"):
            if message.get(key) is not None:
                plain[key] = message[key]
        normalized.append(plain)
    return normalized


class ChatTemplate:
    """Renders messages to text with the tokenizer's chat template (or one given by the caller)."""

    def __init__(self, tokenizer, template: str | None = None):
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat template; "
                "pass chat_template=... (a Jinja string) or use an instruct/chat checkpoint"
            )
        self.tokenizer = tokenizer
        self.template = template

    def render(self, messages: list[Message], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
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
