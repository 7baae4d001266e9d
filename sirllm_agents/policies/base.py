"""What every eviction policy answers: how the cached tokens rank, so that a full cache keeps the highest."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

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


class Policy(ABC):
    """Chooses the tokens a full cache keeps by ranking them: :meth:`ranks` is all a policy writes.

    The cache's settings (:class:`~sirllm_agents.config.SessionConfig`) own the attention sinks and the recent window;
    :meth:`keep` takes those and fills the rest of the budget with the highest-ranked tokens between them.

    A policy declares what it needs of the settings: ``scored`` policies rank by token entropy, and the settings then
    protect the newest tokens by default (an eighth of the cache), since a reply's own fresh tokens rank low and the
    reply would lose its form; ``evicts = False`` (``full``) means the cache defaults to the model's whole length.
    """

    name: ClassVar[str]
    scored: ClassVar[bool] = True
    evicts: ClassVar[bool] = True

    @abstractmethod
    def ranks(self, tokens: CachedTokens) -> torch.Tensor:
        """One float per cached token: the higher, the longer it stays. Only called when the cache is full."""

    def keep(self, tokens: CachedTokens, budget: int, start_size: int, recent_size: int) -> torch.Tensor:
        """The indices of the tokens that stay, ascending, ``budget`` of them (fewer than ``len(tokens)``)."""
        return keep_top(self.ranks(tokens), budget, start_size, recent_size)


def keep_top(ranks: torch.Tensor, budget: int, start_size: int, recent_size: int) -> torch.Tensor:
    """The ``start_size`` first tokens (attention sinks), the ``recent_size`` newest, and the highest ``ranks`` in
    between, up to ``budget`` in all, ascending."""
    n = ranks.numel()
    middle_end = n - recent_size
    top = ranks[start_size:middle_end].topk(budget - start_size - recent_size).indices + start_size
    sinks = torch.arange(start_size)
    recent = torch.arange(middle_end, n)
    return torch.cat((sinks, top.sort().values, recent))
