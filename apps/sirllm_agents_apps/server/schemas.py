"""The bodies of ``POST /v1/chat/completions``: the request, checked with pydantic, and its conversion to the core's
call; the completion, its streamed chunks, usage and the error body, as pydantic models built from the core's types.

Fields the server acts on: ``model``, ``messages``, ``stream``, ``stream_options.include_usage``, ``tools``,
``tool_choice``, ``response_format``, ``stop``, ``max_tokens`` / ``max_completion_tokens``, ``temperature``,
``top_p``, ``seed``, ``frequency_penalty``, ``presence_penalty`` and, as extensions named as llama.cpp's server names
them, ``top_k``, ``repeat_penalty``, ``repeat_last_n`` and DRY's ``dry_multiplier``, ``dry_base``,
``dry_allowed_length``, ``dry_penalty_last_n``, ``dry_sequence_breakers`` (left out: the core's default, see
:mod:`sirllm_agents.penalties`). Fields that would change what comes back and that the server cannot honour are
refused (``n > 1``, ``logprobs``, ``logit_bias``); any other field (``user``, ``metadata``, ``store``,
``parallel_tool_calls``, ...) is ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sirllm_agents import Reply, TextDelta, ToolCallDelta, TurnStats
from sirllm_agents.penalties import Penalties


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: float | None = Field(default=None, gt=0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    dry_multiplier: float | None = Field(default=None, ge=0)
    dry_base: float | None = Field(default=None, ge=1)
    dry_allowed_length: int | None = Field(default=None, ge=1)
    dry_penalty_last_n: int | None = Field(default=None, ge=-1)
    dry_sequence_breakers: list[str] | None = None
    # Refused unless left at what changes nothing:
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` for the first option the server cannot honour, else None."""
        if self.n is not None and self.n != 1:
            return "n", f"n={self.n} is not supported: this server returns one choice per request (n=1)"
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not supported by this server"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server"
        return None

    def core_messages(self) -> list[dict[str, Any]]:
        """The messages as the core takes them: content given as a list of text parts is joined into one string
        (other parts are refused), and a ``developer`` message is a system message. The core reads tool-call
        arguments sent as JSON strings and ``content: null`` beside tool calls itself, and checks roles and content.
        Only the messages that change are copied: the others are passed as they were read, so that a long
        conversation costs one look at each message."""
        messages = self.messages
        for i, message in enumerate(messages):
            if type(message.get("content")) is list or message.get("role") == "developer":
                if messages is self.messages:
                    messages = list(messages)
                messages[i] = _as_core(i, message)
        return messages

    def options(self, default_max_tokens: int | None = None) -> dict[str, Any]:
        """The keyword arguments of ``Engine.astream`` for this request (messages and session aside). What the
        request leaves out is left out here, so that the library's defaults (``GenerationConfig``) apply; the reply's
        bound falls back to ``default_max_tokens`` first, when given."""
        options: dict[str, Any] = {
            "max_new_tokens": self.max_completion_tokens or self.max_tokens or default_max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop or None,
        }
        options.update((name, getattr(self, name)) for name in Penalties.names() if getattr(self, name) is not None)
        if self.tools:
            options["tools"] = self.tools
            options["tool_choice"] = self.tool_choice
        elif self.tool_choice not in (None, "none", "auto"):
            raise ValueError(f"tool_choice={self.tool_choice!r} needs tools")
        if self.response_format is not None and self.response_format.get("type") != "text":
            options["response_format"] = self.response_format
        return options


def _as_core(i: int, message: dict[str, Any]) -> dict[str, Any]:
    message = dict(message)
    if isinstance(message.get("content"), list):
        message["content"] = _join_parts(i, message["content"])
    if message.get("role") == "developer":  # OpenAI's newer name for system instructions
        message["role"] = "system"
    return message


def _join_parts(i: int, parts: list[Any]) -> str:
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}")
    return "".join(texts)


# -- responses --------------------------------------------------------------------------------------------------------


def _omitted_when_none() -> Any:
    """A field, None by default, left out of the JSON when None (OpenAI's bodies omit these rather than send null)."""
    return Field(default=None, exclude_if=lambda value: value is None)


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, stats: TurnStats) -> Usage:
        """``cached_tokens`` is the prompt tokens reused from the session's cache."""
        return cls(
            prompt_tokens=stats.input_tokens,
            completion_tokens=stats.generated_tokens,
            total_tokens=stats.input_tokens + stats.generated_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=stats.reused_tokens),
        )


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as in OpenAI's API


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = _omitted_when_none()

    @classmethod
    def of(cls, reply: Reply) -> AssistantMessage:
        """The reply as OpenAI's message: with tool calls, ``content`` is null when empty."""
        if not reply.tool_calls:
            return cls(content=reply.content)
        calls = [
            ToolCall(
                id=call.id,
                function=FunctionCall(name=call.name, arguments=json.dumps(call.arguments, ensure_ascii=False)),
            )
            for call in reply.tool_calls
        ]
        return cls(content=reply.content or None, tool_calls=calls)


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[Choice]
    usage: Usage

    @classmethod
    def of(cls, reply: Reply, completion_id: str, created: int, model: str) -> ChatCompletion:
        choice = Choice(message=AssistantMessage.of(reply), finish_reason=reply.finish_reason)
        return cls(id=completion_id, created=created, model=model, choices=[choice], usage=Usage.of(reply.stats))


class ToolCallPiece(ToolCall):
    """A streamed tool call: whole, with its place among the reply's calls."""

    index: int


class Delta(BaseModel):
    """What a chunk adds: only the fields it sets are written."""

    role: Literal["assistant"] | None = _omitted_when_none()
    content: str | None = _omitted_when_none()
    tool_calls: list[ToolCallPiece] | None = _omitted_when_none()

    @classmethod
    def of(cls, event: TextDelta | ToolCallDelta) -> Delta:
        if isinstance(event, TextDelta):
            return cls(content=event.text)
        function = FunctionCall(name=event.name, arguments=event.arguments)
        return cls(tool_calls=[ToolCallPiece(index=event.index, id=event.id, function=function)])


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a stream. ``usage`` is written only when the request asked for it
    (``stream_options.include_usage``): null on every chunk but the last, which has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def sse(self, include_usage: bool) -> str:
        return sse(self.model_dump(mode="json", exclude=None if include_usage else {"usage"}))


def sse(data: dict[str, Any]) -> str:
    """One server-sent event carrying ``data`` as JSON (with spaces after separators, as the stream always had)."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body, with the id of the request it answers (also in the ``X-Request-Id`` header)."""

    error: ErrorDetail
    request_id: str | None = None
