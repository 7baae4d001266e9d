from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CachedTokens, Policy


def word_starts(tokens: CachedTokens) -> torch.Tensor:
    """Per token, whether it begins a word."""
    starts = tokens.word_start.clone()
    starts[0] = True
    starts[1:] |= tokens.sentence_end[:-1]  # "\nMy": a word starts after a line break even with no space mark
    return starts


def word_surprisal(tokens: CachedTokens) -> torch.Tensor:
    """Per token, the surprisal of the word it belongs to: the sum of its tokens' entropies, ``-log p(word | before)``.
    A number or a rare name split into several tokens counts as much as it surprised the model as a whole."""
    word = word_starts(tokens).cumsum(0) - 1
    sums = torch.zeros(int(word[-1]) + 1, dtype=tokens.scores.dtype).index_add_(0, word, tokens.scores)
    return sums[word]


@dataclass
class WordsPolicy(Policy):
    """SirLLM over whole words: a word is kept or evicted with all its tokens, ranked by its surprisal (the sum of
    its tokens' entropies), so a kept fact is never a fragment such as the first half of a name."""

    name: ClassVar[str] = "words"

    def ranks(self, tokens: CachedTokens) -> torch.Tensor:
        return word_surprisal(tokens)
