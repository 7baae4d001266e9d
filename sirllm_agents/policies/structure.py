from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CachedTokens, keep_top

ABOVE_TEXT = 1e6  # template tokens rank this far above every message token


@dataclass
class StructurePolicy:
    """SirLLM that never evicts the chat template's tokens (role markers, ends of turn) while the budget holds them,
    so every turn stays a turn; message tokens compete by entropy for the rest. Past the budget, the template tokens
    with the lowest entropy go too."""

    start_size: int = 4
    recent_size: int = 0
    name: str = "structure"

    def keep(self, tokens: CachedTokens, budget: int) -> torch.Tensor:
        ranks = torch.where(tokens.template, tokens.scores + ABOVE_TEXT, tokens.scores)
        return keep_top(ranks, budget, self.start_size, self.recent_size)
