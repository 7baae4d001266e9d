"""What a reply must be and how it comes back: the constraint chosen from ``tool_choice`` / ``response_format``, the
stream of typed events, and the finished :class:`Reply` with its tool calls parsed.

One request path for every caller: the session takes OpenAI-style ``tools``, ``tool_choice`` and
``response_format`` and does the rest here, so the framework adapters only convert types.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .constrained import json_object_constraint, json_schema_constraint, tool_call_constraint
from .generation import TokenConstraint
from .tools import TOOL_CALL_START, ToolCall, normalize_tools, split_tool_calls
from .transcript import check_messages, normalize_message

if TYPE_CHECKING:
    from .model import Model
    from .session import Session
    from .stats import TurnStats

REQUIRED = "required"


@dataclass
class Reply:
    """A finished reply. ``content`` is the text shown (tool-call markup taken out), ``tool_calls`` the calls parsed
    from it, ``text`` exactly what the model wrote. ``finish_reason``: ``"stop"`` (end of turn or a stop string),
    ``"length"`` (``max_new_tokens`` reached) or ``"tool_calls"``. ``closed_at_limit``: a constrained reply
    whose value was closed early (its last strings shortened, missing required keys at their smallest) so that it
    ends whole within ``max_new_tokens``; its ``finish_reason`` is then ``"stop"`` (or ``"tool_calls"``)."""

    content: str
    tool_calls: list[ToolCall]
    finish_reason: str
    text: str
    token_ids: list[int]  # the tokens sampled, before any stop string was cut off
    stats: TurnStats
    session_id: str = ""
    closed_at_limit: bool = False  # a constrained value closed early to fit max_new_tokens (see closing.py)

    def as_message(self) -> dict[str, Any]:
        """The reply as the assistant message to send back with the next call."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.as_message_call() for call in self.tool_calls]
        return message


@dataclass(frozen=True)
class TextDelta:
    """The next piece of the reply's content."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One tool call of the reply, whole: ``arguments`` is its JSON text."""

    index: int
    id: str
    name: str
    arguments: str


Event = TextDelta | ToolCallDelta


class ReplyStream:
    """Iterates over a reply's events (:class:`TextDelta`, then any :class:`ToolCallDelta`) as they are decoded;
    ``reply`` is set once it is exhausted, and ``session`` names the session the reply runs on (for
    ``Engine.stream``, once the first event was asked for). ``text()`` iterates the content pieces alone."""

    def __init__(self, events: Generator[Event, None, Reply], session: Session | None = None):
        self._events = events
        self.session = session
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            return next(self._events)
        except StopIteration as done:
            if self.reply is None:  # an exhausted generator stops again without the reply
                self.reply = done.value
            raise

    def text(self) -> Iterator[str]:
        """The content as it is decoded, piece by piece."""
        return (event.text for event in self if isinstance(event, TextDelta))

    def finish(self) -> Reply:
        """Decode to the end and return the reply."""
        for _ in self:
            pass
        assert self.reply is not None
        return self.reply

    def close(self) -> None:
        """Abandon the reply: the session rolls it back (see ``Session.stream``)."""
        self._events.close()


def normalize_tool_choice(choice: Any, tools: Sequence[Mapping[str, Any]] | None) -> str:
    """``tool_choice`` in one form: ``"auto"``, ``"none"``, ``"required"`` or a tool's name. Takes OpenAI's forms
    (``"required"``, ``{"type": "function", "function": {"name": ...}}``), LangChain's (``"any"``, ``True``, a name)
    and ``None`` / ``False``."""
    if isinstance(choice, Mapping):
        choice = (choice.get("function") or {}).get("name") or choice.get("name") or choice.get("type")
    choice = {None: "auto", False: "none", True: REQUIRED, "any": REQUIRED}.get(choice, choice)
    names = [tool.get("function", tool).get("name") for tool in tools or []]
    if choice in ("auto", "none"):
        return choice
    if choice == REQUIRED or choice in names:
        if not names:
            raise ValueError(f"tool_choice={choice!r} needs tools")
        return choice
    raise ValueError(
        f"tool_choice must be 'auto', 'none', 'any', 'required' or one of the tool names {names}, got {choice!r}"
    )


def response_schema(response_format: Mapping[str, Any]) -> dict | None:
    """The JSON schema of ``{"type": "json_schema", "schema": ...}`` (or OpenAI's ``{"type": "json_schema",
    "json_schema": {"schema": ...}}``); None for ``{"type": "json_object"}``. Anything else is an error."""
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "json_object":
        return None
    if kind == "json_schema":
        schema = response_format.get("schema") or (response_format.get("json_schema") or {}).get("schema")
        if isinstance(schema, Mapping):
            return dict(schema)
        raise ValueError(
            "response_format json_schema needs a schema: {'type': 'json_schema', 'json_schema': "
            "{'name': ..., 'schema': {...}}}"
        )
    raise ValueError(f"response_format must be of type 'json_schema' or 'json_object', got {response_format!r}")


@dataclass
class Request:
    """What one call asks for, once checked: the messages as the session ingests them (format instructions added;
    the session checks those it does not hold yet), the tools (normalized), whose calls are read from the reply, the
    constraint on decoding, and how much text may be streamed while the reply could still turn out to be a call."""

    messages: Sequence[Mapping[str, Any]]
    tools: list[dict] | None
    read_calls: bool
    constraint: TokenConstraint | None
    stream_mode: Literal["pass", "auto", "hold"]


def plan_request(
    model: Model,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: Any,
    response_format: Mapping[str, Any] | None,
) -> Request:
    """Check a call's tool and format options and choose its constraint: a JSON grammar for ``response_format``, a
    tool-call grammar when a call is required (``tool_choice`` ``"required"`` or a tool's name), none otherwise."""
    specs = normalize_tools(tools) if tools else None
    choice = normalize_tool_choice(tool_choice, specs)
    constraint = None
    messages = messages_as_held(messages, response_format)
    if response_format is not None:
        schema = response_schema(response_format)
        constraint = json_schema_constraint(model, schema) if schema is not None else json_object_constraint(model)
    elif specs and choice not in ("auto", "none"):
        constraint = tool_call_constraint(model, specs, choice)
    read_calls = bool(specs) and choice != "none" and response_format is None
    mode = "pass" if not read_calls else ("hold" if constraint is not None else "auto")
    return Request(messages, specs, read_calls, constraint, mode)


def messages_as_held(
    messages: Sequence[Mapping[str, Any]], response_format: Mapping[str, Any] | None
) -> Sequence[Mapping[str, Any]]:
    """``messages`` as a session ingests them: with a ``response_format``, the system message tells the model the
    JSON it is held to (the grammar enforces the shape; the prompt gives it the meaning). The pool routes on these,
    so a resent JSON conversation finds its session. Only the first message is read here (the session checks the
    others as it takes them in)."""
    messages = check_messages(messages)
    if response_format is None:
        return messages
    schema = response_schema(response_format)
    if schema is None:
        instruction = "Reply with a JSON object."
    else:
        instruction = "Reply with a JSON object that follows this JSON schema:\n" + json.dumps(
            schema, ensure_ascii=False
        )
    first = normalize_message(0, messages[0])
    if first["role"] == "system":
        return [{**first, "content": f"{first['content']}\n\n{instruction}".lstrip("\n")}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def finish_reply(request: Request, text: str, finish_reason: str, token_ids: list[int], stats: TurnStats) -> Reply:
    """The reply for ``text``: its calls parsed out when the request reads them. A constrained reply cut off by
    ``max_new_tokens`` (one whose value could not be closed in time) is returned as it is, with
    ``finish_reason="length"``, as OpenAI's API does."""
    content, calls = split_tool_calls(text, request.tools) if request.read_calls else (text, [])
    closed = bool(getattr(request.constraint, "closed_at_limit", False))
    return Reply(content, calls, "tool_calls" if calls else finish_reason, text, token_ids, stats, "", closed)


@dataclass
class ShownText:
    """How much of the reply may be streamed as content while it may still turn out to be a tool call.

    ``pass``: everything; ``hold``: nothing (a required call). ``auto``: text up to where a call could begin, never
    leading or trailing whitespace, and nothing of a reply that opens like a JSON call; so what was shown is always
    the start of the final content, whichever way the reply turns out."""

    mode: Literal["pass", "auto", "hold"]
    text: str = ""
    _reply: str = field(default="", repr=False)
    _held: bool = False

    def push(self, piece: str) -> str:
        self._reply += piece
        if self.mode == "pass":
            end = len(self._reply)
        elif self.mode == "hold" or self._held:
            return ""
        else:
            reply = self._reply
            if reply[:1].isspace() or reply[:1] in ("{", "[", "`"):
                self._held = True
                return ""
            end = reply.find(TOOL_CALL_START)
            if end >= 0:
                self._held = True
            else:
                end = len(reply) - _partial_suffix(reply, TOOL_CALL_START)
            end = len(reply[:end].rstrip())
        new = self._reply[len(self.text) : end] if end > len(self.text) else ""
        self.text += new
        return new

    def rest(self, reply: Reply) -> Iterator[Event]:
        """The events still owed once ``reply`` is known: the content not yet shown, then each call."""
        if reply.content.startswith(self.text) and len(reply.content) > len(self.text):
            yield TextDelta(reply.content[len(self.text) :])
        for index, call in enumerate(reply.tool_calls):
            yield ToolCallDelta(index, call.id, call.name, json.dumps(call.arguments, ensure_ascii=False))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
