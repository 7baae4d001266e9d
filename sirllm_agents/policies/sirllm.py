from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SirLLMPolicy:
    """SirLLM (Yao et al., ACL 2024): keep the attention sinks, the ``recent_size`` newest tokens, and then the
    tokens with the highest stored (decayed) token entropy ``-log p(x_i | x_<i)``."""

    start_size: int = 4
    recent_size: int = 0
    name: str = "sirllm"

    def keep(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        n = scores.numel()
        middle_end = n - self.recent_size
        k = budget - self.start_size - self.recent_size
        top = scores[self.start_size : middle_end].topk(k).indices + self.start_size
        sinks = torch.arange(self.start_size, device=scores.device)
        recent = torch.arange(middle_end, n, device=scores.device)
        return torch.cat((sinks, top.sort().values, recent))
