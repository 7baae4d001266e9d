from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import CachedTokens, Policy
from .density import sentence_density
from .sentences import BELOW_TEXT, sentence_index, text_first
from .words import word_starts, word_surprisal

LEAD_WORDS = 4  # a clause opening with the same four words as an older one ("my locker code is") restates it
SUPERSEDED = -BELOW_TEXT / 2  # below every live sentence of message text, above the chat template's tokens


@dataclass(frozen=True)
class Clause:
    """A clause of message text: the sentence it is in, its words (each a tuple of token ids) and each word's
    surprisal (the sum of its tokens' entropies)."""

    sentence: int
    words: tuple[tuple[int, ...], ...]
    surprisal: tuple[float, ...]


# Given the older clauses of one opening (oldest first) and a newer clause, the one it restates, if any.
Restates = Callable[[list[Clause], Clause], Clause | None]


def clauses(tokens: CachedTokens, sentence: torch.Tensor) -> list[Clause]:
    """The clauses of message text in cache order. Clauses end at ``,`` ``:`` ``;`` and at sentence ends, so a
    repeated preamble ("Please remember this:") is a clause of its own; a template run is a sentence of its own, so
    the first text token after one starts a clause and a word."""
    clause_start = torch.ones_like(tokens.template)
    clause_start[1:] = (sentence[1:] != sentence[:-1]) | tokens.clause_end[:-1]
    word_start = word_starts(tokens) | clause_start
    found: list[tuple[int, list[list[int]], list[float]]] = []  # (sentence, words, their surprisals) per clause
    rows = zip(
        tokens.token_ids.tolist(),
        sentence.tolist(),
        clause_start.tolist(),
        word_start.tolist(),
        tokens.template.tolist(),
        tokens.scores.tolist(),
    )
    for token_id, index, starts_clause, starts_word, in_template, score in rows:
        if in_template:
            continue
        if starts_clause:
            found.append((index, [], []))
        if starts_word:
            found[-1][1].append([])
            found[-1][2].append(0.0)
        found[-1][1][-1].append(token_id)
        found[-1][2][-1] += score
    return [Clause(index, tuple(map(tuple, words)), tuple(surprisal)) for index, words, surprisal in found]


def says_something_else(older: list[Clause], newer: Clause) -> Clause | None:
    """``supersede``'s rule: a clause restates the newest older clause of its opening when it ends otherwise."""
    return older[-1] if older[-1].words != newer.words else None


def restatements(
    tokens: CachedTokens, sentence: torch.Tensor, restates: Restates = says_something_else
) -> list[tuple[int, int]]:
    """(older, newer) sentence pairs, in the newer's order, where a clause of the newer sentence opens with the same
    ``LEAD_WORDS`` words as older clauses and ``restates`` says which of those it restates (one in another
    sentence): by default the newest, when it then says something else ("my locker code is 4821" restated as "my
    locker code is 5173 now"). A repeated preamble is a clause of its own, repeated whole, and restates nothing."""
    older: dict[tuple, list[Clause]] = {}  # per lead, its clauses so far
    pairs = []
    for clause in clauses(tokens, sentence):
        if len(clause.words) < LEAD_WORDS:
            continue
        lead = clause.words[:LEAD_WORDS]
        earlier = older.get(lead)
        restated = restates(earlier, clause) if earlier else None
        if restated is not None and restated.sentence != clause.sentence:
            pairs.append((restated.sentence, clause.sentence))
        older.setdefault(lead, []).append(clause)
    return pairs


def supersede_ranks(tokens: CachedTokens, peak: float, restates: Restates = says_something_else) -> torch.Tensor:
    """``density``'s ranks, where each restated sentence gives its rank to the newer one and goes first."""
    sentence, words = sentence_index(tokens), word_surprisal(tokens)
    ranks = sentence_density(tokens, sentence, words, peak)
    for older, newer in restatements(tokens, sentence, restates):
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
