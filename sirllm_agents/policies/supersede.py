from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CachedTokens, Policy
from .density import sentence_density
from .sentences import BELOW_TEXT, sentence_index, text_first
from .words import word_starts, word_surprisal

LEAD_WORDS = 4  # a clause opening with the same four words as an older one ("my locker code is") restates it
SUPERSEDED = -BELOW_TEXT / 2  # below every live sentence of message text, above the chat template's tokens


def restatements(tokens: CachedTokens, sentence: torch.Tensor) -> list[tuple[int, int]]:
    """(older, newer) sentence pairs, in the newer's order, where a clause of the newer sentence opens with the same
    ``LEAD_WORDS`` words as a clause of the older one and then says something else: "my locker code is 4821"
    restated as "my locker code is 5173 now". Clauses end at ``,`` ``:`` ``;`` and at sentence ends, so a repeated
    preamble ("Please remember this:") is a clause of its own, repeated whole, and restates nothing."""
    clause_start = torch.ones_like(tokens.template)
    clause_start[1:] = (sentence[1:] != sentence[:-1]) | tokens.clause_end[:-1]
    word_start = word_starts(tokens) | clause_start
    clauses: list[tuple[int, list[list[int]]]] = []  # (sentence, words as token ids) per clause of message text
    # A template run is a sentence of its own, so the first text token after one starts a clause and a word.
    rows = zip(
        tokens.token_ids.tolist(),
        sentence.tolist(),
        clause_start.tolist(),
        word_start.tolist(),
        tokens.template.tolist(),
    )
    for token_id, index, starts_clause, starts_word, in_template in rows:
        if in_template:
            continue
        if starts_clause:
            clauses.append((index, []))
        if starts_word:
            clauses[-1][1].append([])
        clauses[-1][1][-1].append(token_id)
    newest: dict[tuple, tuple[int, tuple]] = {}  # a lead's newest clause: (sentence, words)
    pairs = []
    for index, word_ids in clauses:
        if len(word_ids) < LEAD_WORDS:
            continue
        words = tuple(map(tuple, word_ids))
        lead = words[:LEAD_WORDS]
        if lead in newest and newest[lead][1] != words and newest[lead][0] != index:
            pairs.append((newest[lead][0], index))
        newest[lead] = (index, words)
    return pairs


def supersede_ranks(tokens: CachedTokens, peak: float) -> torch.Tensor:
    """``density``'s ranks, where each restated sentence gives its rank to the newer one and goes first."""
    sentence, words = sentence_index(tokens), word_surprisal(tokens)
    ranks = sentence_density(tokens, sentence, words, peak)
    for older, newer in restatements(tokens, sentence):
        ranks[newer] = torch.maximum(ranks[newer], ranks[older])
        ranks[older] = SUPERSEDED
    return text_first(tokens, sentence, ranks, words)


@dataclass
class SupersedePolicy(Policy):
    """``density`` where the newest statement of a subject wins. When a later clause restates an earlier one (same
    opening words, new ending: "Update: my locker code is 5173 now"), the earlier sentence is evicted before any
    other message text, and the later one ranks at least as high as it did. Without this, a restatement is
    predictable (its subject was said before), so it ranks low and goes while the stale value stays; and where both
    stay, a small model often answers with the old one. Costs: an older sentence of the same opening
    ("What is the capital of France?" before "... of Japan?") goes first too, and so does a user's fact that a
    later reply restates wrongly."""

    peak: float = 0.1
    name: ClassVar[str] = "supersede"

    def ranks(self, tokens: CachedTokens) -> torch.Tensor:
        return supersede_ranks(tokens, self.peak)
