from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StreamingPolicy:
    """StreamingLLM (Xiao et al., ICLR 2024): keep the attention sinks and fill the rest with the newest tokens."""

    start_size: int = 4
    recent_size: int = 0
    name: str = "streaming"

    def keep(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        n = scores.numel()
        sinks = torch.arange(self.start_size, device=scores.device)
        recent = torch.arange(n - (budget - self.start_size), n, device=scores.device)
        return torch.cat((sinks, recent))
