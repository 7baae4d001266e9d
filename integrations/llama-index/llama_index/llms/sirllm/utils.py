"""Conversions between LlamaIndex chat messages and the OpenAI-style dicts a sirllm-agents session takes, and from
its replies to LlamaIndex responses. (The session recognises its own earlier replies as they come back, surrounding
whitespace stripped by chat engines included, so nothing about them needs carrying here.)"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)

from sirllm_agents import Session, TurnStats

# LlamaIndex roles, including other providers' names for the same ones, to the roles a chat template knows.
ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


def to_session_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI-style dicts for ``messages``; raises ``ValueError`` naming the first message it cannot send."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of ChatMessage, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: SirLLM needs at least one ChatMessage")
    return [_to_session_message(i, message) for i, message in enumerate(messages)]


def _to_session_message(index: int, message: ChatMessage) -> dict[str, Any]:
    if not isinstance(message, ChatMessage):
        raise ValueError(f"messages[{index}] must be a ChatMessage, got {type(message).__name__}")
    try:
        role = ROLES[MessageRole(message.role)]
    except (KeyError, ValueError):
        known = ", ".join(sorted({r.value for r in ROLES}))
        raise ValueError(f"messages[{index}]: unknown role {message.role!r} (SirLLM takes {known})") from None
    texts: list[str] = []
    block_calls: list[dict[str, Any]] = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolCallBlock):
            block_calls.append(_tool_call_dict(block.tool_call_id, block.tool_name, block.tool_kwargs))
        elif not isinstance(block, (ThinkingBlock, CachePoint)):
            raise ValueError(
                f"messages[{index}] ({role}) holds a {block.block_type!r} block: SirLLM takes text, tool calls and "
                "tool results only"
            )
    content = "\n".join(texts)  # as ChatMessage.content joins its text blocks
    extra = message.additional_kwargs
    converted: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        listed = extra.get("tool_calls")
        tool_calls = [_normalize_tool_call(index, call) for call in listed] if listed else block_calls
        if tool_calls:
            converted["tool_calls"] = tool_calls
    elif role == "tool":
        if extra.get("tool_call_id") is not None:
            converted["tool_call_id"] = str(extra["tool_call_id"])
        name = extra.get("name", extra.get("tool_name"))
        if name is not None:
            converted["name"] = str(name)
    return converted


def _normalize_tool_call(index: int, call: Any) -> dict[str, Any]:
    """A tool call from ``additional_kwargs["tool_calls"]``: an OpenAI-style dict or SDK object."""
    if hasattr(call, "model_dump"):
        call = call.model_dump()
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(
            f"messages[{index}]: a tool call must look like {{'id': ..., 'function': {{'name': ..., 'arguments': "
            f"...}}}}, got {call!r}"
        )
    return _tool_call_dict(call.get("id"), function["name"], function.get("arguments"))


def _tool_call_dict(call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):  # else kept as the model wrote it
            arguments = json.loads(arguments) if arguments.strip() else {}
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments or {}}}
    if call_id is not None:
        call["id"] = call_id
    return call


def usage(stats: TurnStats) -> dict[str, int]:
    """Token usage of one call, under the names LlamaIndex's ``TokenCountingHandler`` reads."""
    return {
        "prompt_tokens": stats.input_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.input_tokens + stats.generated_tokens,
        "cached_tokens": stats.reused_tokens,
    }


def raw_response(stats: TurnStats, finish_reason: str, model: str, session: Session) -> dict[str, Any]:
    """``ChatResponse.raw``: usage, why decoding stopped, and the session's figures for the call."""
    return {
        "model": model,
        "finish_reason": finish_reason,
        "usage": usage(stats),
        "sirllm": {**asdict(stats), "cache_size": session.cache_size, "session_id": session.session_id},
    }
