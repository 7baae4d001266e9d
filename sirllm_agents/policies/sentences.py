from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CachedTokens, keep_top
from .words import word_surprisal

BELOW_TEXT = 1e6  # template tokens rank this far below every message token


def sentence_ranks(tokens: CachedTokens) -> torch.Tensor:
    """Per message token, the surprisal of the most surprising word in its sentence (plus a small share of its own
    word's, so a sentence that cannot be kept whole keeps its most surprising words); the chat template's tokens rank
    below all of them, by their own entropy."""
    words = word_surprisal(tokens)
    template = tokens.template
    starts = torch.zeros_like(template)
    starts[0] = True
    starts[1:] = tokens.sentence_end[:-1] | template[:-1] | template[1:]
    sentence = starts.cumsum(0) - 1
    text_words = words.masked_fill(template, -torch.inf)
    best = torch.full((int(sentence[-1]) + 1,), -torch.inf, dtype=words.dtype)
    best = best.scatter_reduce(0, sentence, text_words, "amax")
    return torch.where(template, tokens.scores - BELOW_TEXT, best[sentence] + 1e-3 * words)


@dataclass
class SentencesPolicy:
    """SirLLM over whole sentences of message text: each sentence ranks by its most surprising word, so a fact is
    kept as the readable statement it came in ("the door code is 8735.") rather than as scattered high-entropy tokens
    the model then imitates. The chat template's own tokens (role markers, ends of turn) go first."""

    start_size: int = 4
    recent_size: int = 0
    name: str = "sentences"

    def keep(self, tokens: CachedTokens, budget: int) -> torch.Tensor:
        return keep_top(sentence_ranks(tokens), budget, self.start_size, self.recent_size)
