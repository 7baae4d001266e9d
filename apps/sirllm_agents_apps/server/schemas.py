"""The request body of ``POST /v1/chat/completions``, checked with pydantic, and its conversion to the core's call.

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

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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
        arguments sent as JSON strings and ``content: null`` beside tool calls itself, and checks roles and content."""
        messages = []
        for i, message in enumerate(self.messages):
            message = dict(message)
            content = message.get("content")
            if isinstance(content, list):
                message["content"] = _join_parts(i, content)
            if message.get("role") == "developer":  # OpenAI's newer name for system instructions
                message["role"] = "system"
            messages.append(message)
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


def _join_parts(i: int, parts: list[Any]) -> str:
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}")
    return "".join(texts)
