"""Eviction policies: each a small dataclass with one ``keep(scores, budget)`` method."""

from __future__ import annotations

from .base import Policy
from .full import ContextOverflowError, FullPolicy
from .sirllm import SirLLMPolicy
from .streaming import StreamingPolicy

POLICIES: dict[str, type] = {"sirllm": SirLLMPolicy, "streaming": StreamingPolicy, "full": FullPolicy}


def make_policy(name: str, start_size: int, recent_size: int) -> Policy:
    """Build a policy by name (``sirllm``, ``streaming`` or ``full``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: expected one of {', '.join(POLICIES)}")
    if name == "full":
        return FullPolicy()
    return POLICIES[name](start_size=start_size, recent_size=recent_size)


__all__ = ["POLICIES", "ContextOverflowError", "FullPolicy", "Policy", "SirLLMPolicy", "StreamingPolicy", "make_policy"]
