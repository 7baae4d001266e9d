"""Eviction policies: each a small dataclass with one ``ranks(tokens)`` method (see :class:`Policy`)."""

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

POLICIES: dict[str, type[Policy]] = {
    "sirllm": SirLLMPolicy,
    "streaming": StreamingPolicy,
    "full": FullPolicy,
    "words": WordsPolicy,
    "sentences": SentencesPolicy,
    "density": DensityPolicy,
    "structure": StructurePolicy,
    "supersede": SupersedePolicy,
}


def policy_class(name: str) -> type[Policy]:
    """The policy called ``name`` (see ``POLICIES``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: expected one of {', '.join(POLICIES)}")
    return POLICIES[name]


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
    "policy_class",
]
