from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CachedTokens, Policy

ABOVE_TEXT = 1e6  # template tokens rank this far above every message token


@dataclass
class StructurePolicy(Policy):
    """SirLLM that never evicts the chat template's tokens (role markers, ends of turn) while the budget holds them,
    so every turn stays a turn; message tokens compete by entropy for the rest. Past the budget, the template tokens
    with the lowest entropy go too."""

    name: ClassVar[str] = "structure"

    def ranks(self, tokens: CachedTokens) -> torch.Tensor:
        return torch.where(tokens.template, tokens.scores + ABOVE_TEXT, tokens.scores)
