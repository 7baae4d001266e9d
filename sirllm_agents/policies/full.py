from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CachedTokens, Policy


class ContextOverflowError(ValueError):
    """A cache that never evicts was asked to hold more tokens than its bound."""


@dataclass
class FullPolicy(Policy):
    """No eviction: the plain growing KV cache, the upper bound of recall while the conversation fits."""

    name: ClassVar[str] = "full"
    scored: ClassVar[bool] = False
    evicts: ClassVar[bool] = False

    def ranks(self, tokens: CachedTokens) -> torch.Tensor:
        raise ContextOverflowError(
            f"policy 'full' never evicts, but the input does not fit beside the {len(tokens)} cached tokens (the "
            "cache is bounded by the model's maximum length); use policy 'sirllm' or 'streaming' for conversations "
            "of any length"
        )
