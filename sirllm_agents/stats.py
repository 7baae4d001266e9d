"""The figures of a session's calls: what each prefilled, reused, generated and evicted, and the totals."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class TurnStats:
    """Figures of one call. ``input_tokens = reused_tokens + prefilled_tokens`` (on a restart nothing is reused)."""

    input_tokens: int = 0  # tokens of the whole rendered prompt
    reused_tokens: int = 0  # of those, already ingested by earlier calls: not prefilled again
    prefilled_tokens: int = 0  # prompt tokens run through the model this call
    generated_tokens: int = 0
    evicted_tokens: int = 0
    cache_len: int = 0  # tokens in the cache after the call
    restarts: int = 0  # 1 when the conversation did not extend the session's transcript
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass
class SessionStats(TurnStats):
    """Totals over a session's calls; ``cache_len`` is the current length, ``turns`` the completed replies."""

    turns: int = 0

    def add(self, turn: TurnStats) -> None:
        for f in fields(TurnStats):
            if f.name != "cache_len":
                setattr(self, f.name, getattr(self, f.name) + getattr(turn, f.name))
        self.cache_len = turn.cache_len
