"""What every eviction policy answers: given what the cache holds and a budget, which tokens stay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class CachedTokens:
    """What a policy may read about the cached tokens, one entry per token in cache order."""

    scores: torch.Tensor  # float: token entropy -log p(x_i | x_<i), decayed each turn
    template: torch.Tensor  # bool: written by the chat template (role markers, ends of turn), not a message's text
    word_start: torch.Tensor  # bool: the token begins a word (see TokenShapes)
    sentence_end: torch.Tensor  # bool: the token ends a sentence or a line
    clause_end: torch.Tensor  # bool: the token ends a sentence, a line, or a clause (",", ":", ";")
    token_ids: torch.Tensor  # long: the vocabulary id, so that a policy can tell repeated words

    def __len__(self) -> int:
        return self.scores.numel()


@runtime_checkable
class Policy(Protocol):
    """Chooses the tokens a full cache keeps.

    ``keep`` gets the cached tokens and the number that may stay, and returns the indices to keep, ascending, at
    most ``budget`` of them. It is only called when ``len(tokens) > budget``.
    """

    name: str
    start_size: int
    recent_size: int

    def keep(self, tokens: CachedTokens, budget: int) -> torch.Tensor: ...


def keep_top(ranks: torch.Tensor, budget: int, start_size: int, recent_size: int) -> torch.Tensor:
    """The ``start_size`` first tokens (attention sinks), the ``recent_size`` newest, and the highest ``ranks`` in
    between, up to ``budget`` in all, ascending."""
    n = ranks.numel()
    middle_end = n - recent_size
    top = ranks[start_size:middle_end].topk(budget - start_size - recent_size).indices + start_size
    sinks = torch.arange(start_size)
    recent = torch.arange(middle_end, n)
    return torch.cat((sinks, top.sort().values, recent))
