"""Eviction policies: each a small dataclass with one ``keep(tokens, budget)`` method."""

from __future__ import annotations

from .base import CachedTokens, Policy
from .density import DensityPolicy
from .full import ContextOverflowError, FullPolicy
from .sentences import SentencesPolicy
from .sirllm import SirLLMPolicy
from .streaming import StreamingPolicy
from .structure import StructurePolicy
from .supersede import SupersedePolicy
from .words import WordsPolicy

POLICIES: dict[str, type] = {
    "sirllm": SirLLMPolicy,
    "streaming": StreamingPolicy,
    "full": FullPolicy,
    "words": WordsPolicy,
    "sentences": SentencesPolicy,
    "density": DensityPolicy,
    "structure": StructurePolicy,
    "supersede": SupersedePolicy,
}


def make_policy(name: str, start_size: int, recent_size: int) -> Policy:
    """Build a policy by name (see ``POLICIES``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: expected one of {', '.join(POLICIES)}")
    if name == "full":
        return FullPolicy()
    return POLICIES[name](start_size=start_size, recent_size=recent_size)


__all__ = [
    "POLICIES",
    "CachedTokens",
    "ContextOverflowError",
    "DensityPolicy",
    "FullPolicy",
    "Policy",
    "SentencesPolicy",
    "SirLLMPolicy",
    "StreamingPolicy",
    "StructurePolicy",
    "SupersedePolicy",
    "WordsPolicy",
    "make_policy",
]
