from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CachedTokens


@dataclass
class StreamingPolicy:
    """StreamingLLM (Xiao et al., ICLR 2024): keep the attention sinks and fill the rest with the newest tokens."""

    start_size: int = 4
    recent_size: int = 0
    name: str = "streaming"

    def keep(self, tokens: CachedTokens, budget: int) -> torch.Tensor:
        n = len(tokens)
        return torch.cat((torch.arange(self.start_size), torch.arange(n - (budget - self.start_size), n)))
