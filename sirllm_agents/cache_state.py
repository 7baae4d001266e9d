"""A conversation's cache state, and the plain functions by which tokens enter it.

The state is the bounded cache (runner and per-token records), the conversation position the next token takes, and
the turn its tokens are recorded under. :func:`prefill` ingests a run of tokens, :func:`decode_step` one sampled
token; both own one rule: after a rollback the logits after the newest cached token are gone (the runner cut them
off with the rolled-back tokens), so the next forward feeds that token again first, keeping its record, to get the
logits that score what follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .cache import SirLLMCache

Progress = Callable[[int, int], None]  # (tokens done, tokens in all), after each prefill chunk


@dataclass
class CacheState:
    """A conversation's bounded cache, where its next token goes (``position``), and the turn its tokens are recorded
    under (``turn``: the number of replies before them, which the memory view groups by)."""

    cache: SirLLMCache
    position: int = 0
    turn: int = 0

    @property
    def refeed(self) -> int:
        """1 when the next forward must feed the newest cached token again (its logits were rolled back), else 0."""
        return int(self.cache.logits is None and len(self.cache) > 0)

    def truncate(self, position: int) -> None:
        """Cut the conversation back to its first ``position`` tokens (a rollback)."""
        self.cache.truncate(position)
        self.position = position

    def copy(self) -> CacheState:
        return CacheState(self.cache.copy(), self.position, self.turn)


def prefill(
    state: CacheState, ids: Sequence[int], template: Sequence[bool], chunk: int, progress: Progress | None = None
) -> int:
    """Ingest ``ids`` (``template`` marks the tokens the chat template wrote) in forwards of at most ``chunk`` tokens
    that fit the cache, evicting before each. Returns the number of tokens evicted."""
    evicted, refeed = 0, state.refeed
    step = min(chunk, state.cache.max_chunk) - refeed
    for begin in range(0, len(ids), step):
        part = slice(begin, begin + step)
        evicted += state.cache.make_room(len(ids[part]) + refeed)
        _feed(state, ids[part], template[part])
        refeed = 0
        if progress is not None:
            progress(min(begin + step, len(ids)), len(ids))
    return evicted


def decode_step(state: CacheState, token: int, slack: int) -> tuple[torch.Tensor, int]:
    """Feed one sampled token; when that must evict, ``slack`` more slots are freed so the next few tokens need not
    each pay for an eviction. Returns the logits that score the next token, and the number of tokens evicted."""
    evicted = state.cache.make_room(1 + state.refeed, slack)
    _feed(state, [token], [False])
    return state.cache.logits, evicted


def probe(state: CacheState, ids: Sequence[int]) -> float:
    """``-log p(ids | the conversation so far)``, the tokens run and taken out again: the state is left as it was,
    logits included. Needs the logits after the newest token (a prefill just ran)."""
    return state.cache.probe(ids, state.position)


def score_first_token(state: CacheState) -> None:
    """The very first token of a conversation has no logits before it: give it the highest score of its turn."""
    cache = state.cache
    if cache.scores.numel() and torch.isinf(cache.scores[0]):
        of_turn = cache.scores[(cache.turns == state.turn) & torch.isfinite(cache.scores)]
        cache.scores[0] = of_turn.max() if of_turn.numel() else 0.0


def _feed(state: CacheState, ids: Sequence[int], template: Sequence[bool]) -> None:
    positions = range(state.position, state.position + len(ids))
    if state.refeed:
        state.cache.refeed_newest(ids, positions, state.turn, template)
    else:
        state.cache.ingest(ids, positions, state.turn, template)
    state.position += len(ids)
