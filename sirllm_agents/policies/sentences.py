from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CachedTokens, Policy
from .words import word_surprisal

BELOW_TEXT = 1e6  # template tokens rank this far below every message token


def sentence_index(tokens: CachedTokens) -> torch.Tensor:
    """Per token, the number of its sentence: a sentence or line of message text, or a run of template tokens."""
    template = tokens.template
    starts = torch.zeros_like(template)
    starts[0] = True
    starts[1:] = tokens.sentence_end[:-1] | template[:-1] | template[1:]
    return starts.cumsum(0) - 1


def peak_word(tokens: CachedTokens, sentence: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Per sentence, the surprisal of its most surprising word of message text (-inf for template runs)."""
    best = torch.full((int(sentence[-1]) + 1,), -torch.inf, dtype=words.dtype)
    return best.scatter_reduce(0, sentence, words.masked_fill(tokens.template, -torch.inf), "amax")


def text_first(
    tokens: CachedTokens, sentence: torch.Tensor, sentence_ranks: torch.Tensor, words: torch.Tensor
) -> torch.Tensor:
    """Per token, its sentence's rank plus a small share of its own word's surprisal (so a sentence that cannot be
    kept whole keeps its most surprising words); the chat template's tokens rank below all message text, by their
    own entropy."""
    return torch.where(tokens.template, tokens.scores - BELOW_TEXT, sentence_ranks[sentence] + 1e-3 * words)


def sentence_ranks(tokens: CachedTokens) -> torch.Tensor:
    """Per message token, the surprisal of the most surprising word in its sentence (see ``text_first``)."""
    words, sentence = word_surprisal(tokens), sentence_index(tokens)
    return text_first(tokens, sentence, peak_word(tokens, sentence, words), words)


@dataclass
class SentencesPolicy(Policy):
    """SirLLM over whole sentences of message text: each sentence ranks by its most surprising word, so a fact is
    kept as the readable statement it came in ("the door code is 8735.") rather than as scattered high-entropy tokens
    the model then imitates. The chat template's own tokens (role markers, ends of turn) go first."""

    name: ClassVar[str] = "sentences"

    def ranks(self, tokens: CachedTokens) -> torch.Tensor:
        return sentence_ranks(tokens)
