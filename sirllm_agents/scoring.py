"""Scoring options as the assistant's reply: the token ids each option renders to, and the room the longest needs
(each is then probed from the prompt the session has just ingested: see :func:`~sirllm_agents.cache_state.probe`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .cache import SirLLMCache
from .transcript import Transcript

if TYPE_CHECKING:
    from .model import Model


def reply_ids(model: Model, asked: Transcript, options: Sequence[str]) -> list[list[int]]:
    """Token ids of each option as the template renders it in an assistant reply to ``asked``: the text between
    the generation prompt and the end-of-turn marker (found by rendering an empty reply)."""
    template, messages, tools = model.template, asked.messages, asked.tools
    prompt = template.continuation(messages, len(messages), True, tools)

    def after_prompt(text: str) -> str:
        """The rendering of ``text`` as the reply, past the generation prompt."""
        reply = [*messages, {"role": "assistant", "content": text}]
        rendered = template.continuation(reply, len(messages), False, tools)
        if prompt is None or rendered is None or not rendered.startswith(prompt):
            raise ValueError("the chat template does not render a reply after its own generation prompt")
        return rendered[len(prompt) :]

    end = after_prompt("")
    option_ids = []
    for option in options:
        reply = after_prompt(option)
        if end and reply.endswith(end):
            reply = reply[: -len(end)]
        ids = model.encode(reply)
        if not ids:
            raise ValueError(f"option {option!r} renders to no tokens")
        option_ids.append(ids)
    return option_ids


def make_room_for(cache: SirLLMCache, option_ids: list[list[int]]) -> int:
    """Evict once so the longest option fits, so no option evicts anything another option sees; returns how many
    tokens were evicted."""
    longest = max(len(ids) for ids in option_ids)
    if longest - 1 > cache.max_chunk:
        raise ValueError(
            f"an option of {longest} tokens does not fit a cache of {cache.cache_size} tokens "
            f"(at most {cache.max_chunk + 1})"
        )
    return cache.make_room(longest - 1)
