from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CachedTokens


class ContextOverflowError(ValueError):
    """A cache that never evicts was asked to hold more tokens than its bound."""


@dataclass
class FullPolicy:
    """No eviction: the plain growing KV cache, the upper bound of recall while the conversation fits."""

    start_size: int = 0
    recent_size: int = 0
    name: str = "full"

    def keep(self, tokens: CachedTokens, budget: int) -> torch.Tensor:
        raise ContextOverflowError(
            f"policy 'full' never evicts, but this input fits only if {len(tokens) - budget} of the "
            f"{len(tokens)} cached tokens go (the cache is bounded by the model's maximum length); use policy "
            "'sirllm' or 'streaming' for conversations of any length"
        )
