from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CachedTokens, Policy
from .sentences import peak_word, sentence_index, text_first
from .words import word_surprisal


def sentence_density(tokens: CachedTokens, sentence: torch.Tensor, words: torch.Tensor, peak: float) -> torch.Tensor:
    """Per sentence, its mean token entropy plus ``peak`` times its most surprising word's surprisal."""
    count = int(sentence[-1]) + 1
    total = torch.zeros(count, dtype=tokens.scores.dtype).index_add_(0, sentence, tokens.scores)
    length = torch.bincount(sentence, minlength=count).to(tokens.scores.dtype)
    return total / length + peak * peak_word(tokens, sentence, words)


def density_ranks(tokens: CachedTokens, peak: float) -> torch.Tensor:
    """Per message token, its sentence's density (see ``text_first`` for the template's tokens)."""
    sentence, words = sentence_index(tokens), word_surprisal(tokens)
    return text_first(tokens, sentence, sentence_density(tokens, sentence, words, peak), words)


@dataclass
class DensityPolicy(Policy):
    """SirLLM over whole sentences, ranked by how much each tells per cached token: its mean token entropy, plus a
    tenth of its most surprising word's. A fact such as "my dentist appointment is on October 26." is short and
    all of it surprising, so it outranks a long tool-output line whose one rare number would win under the
    ``sentences`` policy, and it is kept as the readable statement the model can answer from. The chat template's
    own tokens go first."""

    peak: float = 0.1
    name: ClassVar[str] = "density"

    def ranks(self, tokens: CachedTokens) -> torch.Tensor:
        return density_ranks(tokens, self.peak)
