from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CachedTokens, Policy


@dataclass
class SirLLMPolicy(Policy):
    """SirLLM (Yao et al., ACL 2024): keep the attention sinks, the ``recent_size`` newest tokens, and then the
    tokens with the highest stored (decayed) token entropy ``-log p(x_i | x_<i)``."""

    name: ClassVar[str] = "sirllm"

    def ranks(self, tokens: CachedTokens) -> torch.Tensor:
        return tokens.scores
