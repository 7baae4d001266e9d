"""The record of every ingested token, evicted or not: what the memory view shows greyed out, and how evictions are
counted per turn. Nothing on the request path reads it.

By default it keeps only the newest ``window`` tokens (up to twice as many between compactions), so a session that
runs for days holds a bounded record; ``window=None`` keeps the whole conversation.
"""

from __future__ import annotations

import torch


class TokenHistory:
    """Token ids and turns by conversation position, from ``start`` (the oldest position still recorded) on."""

    def __init__(self, window: int | None):
        self.window = window
        self.start = 0
        self._ids = torch.empty(256, dtype=torch.int32)
        self._turns = torch.empty(256, dtype=torch.int32)
        self._length = 0

    @property
    def end(self) -> int:
        """The conversation position after the newest recorded token."""
        return self.start + self._length

    @property
    def ids(self) -> torch.Tensor:
        return self._ids[: self._length]

    @property
    def turns(self) -> torch.Tensor:
        return self._turns[: self._length]

    def extend(self, token_ids: torch.Tensor, positions: torch.Tensor, turn: int) -> None:
        """Record the tokens at ``positions`` past :attr:`end` (a token fed again is recorded already)."""
        new = positions >= self.end
        ids = token_ids[new].to(torch.int32)
        if self.window is not None and self._length + ids.numel() > 2 * self.window:
            self._drop_oldest()
        if self._length + ids.numel() > self._ids.numel():
            self._grow(self._length + ids.numel())
        self._ids[self._length : self._length + ids.numel()] = ids
        self._turns[self._length : self._length + ids.numel()] = turn
        self._length += ids.numel()

    def truncate(self, position: int) -> None:
        """Forget the tokens from conversation position ``position`` on."""
        if position < self.start:
            self.start, self._length = position, 0
        self._length = min(self._length, position - self.start)

    def copy(self) -> TokenHistory:
        twin = TokenHistory(self.window)
        twin.start, twin._length = self.start, self._length
        twin._ids, twin._turns = self._ids.clone(), self._turns.clone()
        return twin

    def load(self, start: int, ids: torch.Tensor, turns: torch.Tensor) -> None:
        self.start, self._length = start, ids.numel()
        self._ids = torch.empty(max(256, ids.numel()), dtype=torch.int32)
        self._turns = torch.empty_like(self._ids)
        self._ids[: ids.numel()], self._turns[: ids.numel()] = ids, turns

    def _drop_oldest(self) -> None:
        """Keep the newest ``window`` tokens (so the record never passes twice the window)."""
        drop = max(0, self._length - self.window)
        self._ids[: self._length - drop] = self._ids[drop : self._length].clone()
        self._turns[: self._length - drop] = self._turns[drop : self._length].clone()
        self.start += drop
        self._length -= drop

    def _grow(self, needed: int) -> None:
        size = self._ids.numel()
        while size < needed:
            size *= 2
        self._ids = torch.cat((self._ids[: self._length], torch.empty(size - self._length, dtype=torch.int32)))
        self._turns = torch.cat((self._turns[: self._length], torch.empty(size - self._length, dtype=torch.int32)))
