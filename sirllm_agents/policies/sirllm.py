from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CachedTokens, keep_top


@dataclass
class SirLLMPolicy:
    """SirLLM (Yao et al., ACL 2024): keep the attention sinks, the ``recent_size`` newest tokens, and then the
    tokens with the highest stored (decayed) token entropy ``-log p(x_i | x_<i)``."""

    start_size: int = 4
    recent_size: int = 0
    name: str = "sirllm"

    def keep(self, tokens: CachedTokens, budget: int) -> torch.Tensor:
        return keep_top(tokens.scores, budget, self.start_size, self.recent_size)
