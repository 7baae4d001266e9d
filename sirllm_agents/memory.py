"""What a session remembers: the retained tokens with their scores, and what each turn lost to eviction.

A :class:`Memory` is plain data (no model, no tensors), built from a live session or read back from a session file,
so the terminal and HTML views can show a saved conversation without loading its model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from .session import Session


@dataclass(frozen=True)
class MemoryToken:
    """One ingested token. ``score`` is its decayed entropy score while retained, None once evicted."""

    position: int  # in the whole conversation
    token_id: int
    text: str  # its piece of the decoded conversation (empty when it only starts a multi-token character)
    turn: int  # completed replies before it was ingested
    score: float | None

    @property
    def retained(self) -> bool:
        return self.score is not None


@dataclass(frozen=True)
class TurnMemory:
    """Per turn: tokens ingested during it, and how many of those are still cached or were evicted."""

    turn: int
    ingested: int
    retained: int
    evicted: int


@dataclass(frozen=True)
class Memory:
    """A session's memory. ``tokens`` are the retained tokens in cache order; ``conversation`` is every ingested
    token in conversation order (evicted ones with ``score=None``), or unless the session keeps its history
    (``SessionConfig.keep_history``) the newest of them after the cached tokens older than those, and ``turns``
    counts those; ``cache_lengths`` is the cache length
    after each call (the newest calls), in order."""

    tokens: list[MemoryToken]
    conversation: list[MemoryToken]
    turns: list[TurnMemory]
    cache_lengths: list[int]
    cache_size: int
    policy: str

    @property
    def evicted_per_turn(self) -> dict[int, int]:
        return {t.turn: t.evicted for t in self.turns}

    @classmethod
    def build(
        cls,
        *,
        history_start: int,
        history_ids: list[int],
        history_turns: list[int],
        pieces: list[str],
        cache_positions: list[int],
        cache_scores: list[float],
        cache_ids: list[int],
        cache_turns: list[int],
        cache_pieces: list[str],
        cache_lengths: list[int],
        cache_size: int,
        policy: str,
    ) -> Memory:
        """Assemble the view from the cache's per-token records (see ``SirLLMCache``). The history starts at
        conversation position ``history_start`` (a session records only its newest tokens unless it keeps its
        history); cached tokens older than that come from the cache's own records, with ``cache_pieces``, and lead
        the conversation, so that it still holds every cached token."""
        score_at = dict(zip(cache_positions, cache_scores))
        older = [
            MemoryToken(position, token_id, piece, turn, score)
            for position, score, token_id, turn, piece in zip(
                cache_positions, cache_scores, cache_ids, cache_turns, cache_pieces
            )
            if position < history_start
        ]
        recorded = [
            MemoryToken(position, token_id, piece, turn, score_at.get(position))
            for position, token_id, turn, piece in zip(
                range(history_start, history_start + len(history_ids)), history_ids, history_turns, pieces
            )
        ]
        conversation = older + recorded
        at = {token.position: token for token in conversation}
        tokens = [at[position] for position in cache_positions]
        counts: dict[int, list[int]] = {}
        for token in conversation:
            ingested_retained = counts.setdefault(token.turn, [0, 0])
            ingested_retained[0] += 1
            ingested_retained[1] += token.retained
        turns = [TurnMemory(turn, n, kept, n - kept) for turn, (n, kept) in sorted(counts.items())]
        return cls(tokens, conversation, turns, list(cache_lengths), cache_size, policy)


def token_pieces(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's piece of the decoded text, special tokens included: the pieces join to the whole text, and a
    character split over several tokens is given to the token that completes it."""
    stream = DecodeStream(skip_special_tokens=False)
    backend = tokenizer.backend_tokenizer
    return [stream.step(backend, token_id) or "" for token_id in token_ids]


def session_memory(session: Session) -> Memory:
    """The memory of ``session`` (call with its lock held, or on a session no other thread uses)."""
    cache, tokenizer = session.cache, session.model.tokenizer
    history_ids, cache_ids = cache.history_ids.tolist(), cache.token_ids.tolist()
    return Memory.build(
        history_start=cache.history.start,
        history_ids=history_ids,
        history_turns=cache.history_turns.tolist(),
        pieces=token_pieces(tokenizer, history_ids),
        cache_positions=cache.positions.tolist(),
        cache_scores=cache.scores.tolist(),
        cache_ids=cache_ids,
        cache_turns=cache.turns.tolist(),
        cache_pieces=token_pieces(tokenizer, cache_ids),
        cache_lengths=[turn.cache_len for turn in session.turn_log],
        cache_size=session.cache_size,
        policy=session.policy.name,
    )
