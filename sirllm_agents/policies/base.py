"""What every eviction policy answers: given the stored scores and a budget, which tokens stay."""

from __future__ import annotations

from typing import Protocol

import torch


class Policy(Protocol):
    """Chooses the tokens a full cache keeps.

    ``keep`` gets one score per cached token (in cache order) and the number of tokens that may stay, and returns
    the indices to keep, ascending, at most ``budget`` of them. It is only called when ``len(scores) > budget``.
    """

    name: str
    start_size: int
    recent_size: int

    def keep(self, scores: torch.Tensor, budget: int) -> torch.Tensor: ...
