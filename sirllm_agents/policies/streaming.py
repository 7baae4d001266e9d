from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CachedTokens, Policy


@dataclass
class StreamingPolicy(Policy):
    """StreamingLLM (Xiao et al., ICLR 2024): keep the attention sinks and fill the rest with the newest tokens."""

    name: ClassVar[str] = "streaming"
    scored: ClassVar[bool] = False  # the newest tokens stay anyway: no window to reserve for them

    def ranks(self, tokens: CachedTokens) -> torch.Tensor:
        return torch.arange(len(tokens), dtype=torch.float32)
