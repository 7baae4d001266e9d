from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CachedTokens, Policy
from .supersede import Clause, supersede_ranks

VALUE_WORDS = 2  # after the shared opening, an older clause this short ends in its value ("... is 4821.")


def changed_value(older: list[Clause], newer: Clause) -> Clause | None:
    """The newest of the ``older`` clauses that ``newer`` says again with another value: past their common opening
    the older clause has at most ``VALUE_WORDS`` words left (its value), and the newer one's first word of its own
    is the word that surprised the model most in it (the new value, where the old one stood). "My sister lives in
    Porto now." restates "My sister lives in Lisbon."; "My sister lives in a flat with two cats." does not ("a" is
    no value)."""
    for clause in reversed(older):
        shared = 0
        for old_word, new_word in zip(clause.words, newer.words):
            if old_word != new_word:
                break
            shared += 1
        value_left = 0 < len(clause.words) - shared <= VALUE_WORDS
        if value_left and shared < len(newer.words) and newer.surprisal[shared] >= max(newer.surprisal):
            return clause
    return None


@dataclass
class RestatePolicy(Policy):
    """``supersede`` where only a changed value restates: a later clause that opens like an older one supersedes it
    only when what differs is the older clause's value, at its end, and the newer clause's most surprising word
    stands in its place. A later true sentence that opens alike and goes on to say something else ("My sister lives
    in a flat with two cats." after "My sister lives in Lisbon.") leaves the older one alone."""

    peak: float = 0.1
    name: ClassVar[str] = "restate"

    def ranks(self, tokens: CachedTokens) -> torch.Tensor:
        return supersede_ranks(tokens, self.peak, changed_value)
