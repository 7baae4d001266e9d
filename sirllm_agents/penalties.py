"""Repetition control: the penalties llama.cpp and Ollama ship and the OpenAI API names, applied to a row of logits
before sampling (and before a grammar's mask, so they steer constrained replies too, greedy ones included).

All of them look only at the tokens generated in the current reply, never at the prompt: a JSON reply must be free
to write the key names its schema (quoted in the prompt) spells out.

- ``frequency_penalty`` and ``presence_penalty`` (OpenAI): ``logit -= count * frequency_penalty + (count > 0) *
  presence_penalty``, where ``count`` is how often the token occurs in the reply so far.
- ``repeat_penalty`` over the last ``repeat_last_n`` tokens (llama.cpp): the logit of each token in that window is
  divided by the penalty when positive and multiplied by it when negative.
- DRY, "don't repeat yourself" (koboldcpp, llama.cpp): when the reply's last ``n`` tokens already occurred earlier,
  followed by token ``t``, writing ``t`` again would extend the repetition; for ``n >= dry_allowed_length`` its logit
  is lowered by ``dry_multiplier * dry_base ** (n - dry_allowed_length)``. A repetition never reaches back past a
  sequence breaker (a token whose text holds one of ``dry_sequence_breakers``), so structure such as JSON quotes and
  new lines may repeat freely. The search covers the last ``dry_penalty_last_n`` tokens (-1: the whole reply).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

DRY_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")  # llama.cpp's defaults
_LONGEST_DRY_MATCH = 64  # the penalty is astronomical long before this; it bounds the per-token search


@dataclass(frozen=True)
class Penalties:
    """One reply's repetition penalties; the defaults change nothing."""

    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = DRY_SEQUENCE_BREAKERS

    def __post_init__(self) -> None:
        breakers = self.dry_sequence_breakers
        if isinstance(breakers, str) or any(not isinstance(b, str) or not b for b in breakers):
            raise ValueError(f"dry_sequence_breakers must be a list of non-empty strings, got {breakers!r}")
        object.__setattr__(self, "dry_sequence_breakers", tuple(breakers))
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2 (0 turns it off), got {value}")
        if not self.repeat_penalty > 0:
            raise ValueError(f"repeat_penalty must be > 0 (1 turns it off), got {self.repeat_penalty}")
        if self.dry_multiplier < 0:
            raise ValueError(f"dry_multiplier must be >= 0 (0 turns DRY off), got {self.dry_multiplier}")
        if self.dry_base < 1:
            raise ValueError(f"dry_base must be >= 1, got {self.dry_base}")
        for name, least in (("dry_allowed_length", 1), ("repeat_last_n", -1), ("dry_penalty_last_n", -1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @property
    def active(self) -> bool:
        return bool(
            self.frequency_penalty
            or self.presence_penalty
            or (self.repeat_penalty != 1.0 and self.repeat_last_n)
            or (self.dry_multiplier and self.dry_penalty_last_n)
        )


NO_PENALTIES = Penalties()
# What grammar-constrained replies (tool calls, response_format) use unless told otherwise: DRY at llama.cpp's
# suggested strength (multiplier 0.8, base 1.75, allowed length 2). Chosen with ``sirllm-agents bench structured
# --tuning`` on the embedded model (llama.cpp, 10 held-out prompts x 5 schemas, 128 tokens, closing off): no penalty
# 25/50 replies ended by themselves; DRY 0.8, 1.5 and 3 and repeat_penalty 1.1 each 49/50, frequency_penalty 0.5
# 48/50. DRY, because it only penalises a token that extends a repeated run of tokens: repeat_penalty and the
# frequency penalty also hit a value copied once (a tool call's "age": 36 after a name string holding "36" became 28).
# The measured before/after figures: apps/sirllm_agents_apps/bench/README.md.
CONSTRAINED_PENALTIES = Penalties(dry_multiplier=0.8)


class RepetitionPenalty:
    """Applies :class:`Penalties` to each row of logits of one reply; ``accept`` tells it the token chosen.

    ``token_text`` gives a token's text (to recognise DRY's sequence breakers)."""

    def __init__(self, penalties: Penalties, token_text: Callable[[int], str]):
        self.penalties = penalties
        self.tokens: list[int] = []
        self._counts: dict[int, int] = {}
        self._token_text = token_text
        self._breaks: dict[int, bool] = {}

    def accept(self, token: int) -> None:
        self.tokens.append(token)
        self._counts[token] = self._counts.get(token, 0) + 1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """A penalized copy of ``logits`` (one row), or ``logits`` itself when nothing applies."""
        p = self.penalties
        if not p.active or not self.tokens:
            return logits
        logits = logits.to(torch.float32, copy=True)
        if p.frequency_penalty or p.presence_penalty:
            ids = torch.tensor(list(self._counts), device=logits.device)
            counts = torch.tensor(list(self._counts.values()), dtype=torch.float32, device=logits.device)
            logits[ids] -= counts * p.frequency_penalty + p.presence_penalty
        if p.repeat_penalty != 1.0 and p.repeat_last_n:
            window = self.tokens if p.repeat_last_n == -1 else self.tokens[-p.repeat_last_n :]
            ids = torch.tensor(sorted(set(window)), device=logits.device)
            seen = logits[ids]
            logits[ids] = torch.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
        if p.dry_multiplier and p.dry_penalty_last_n:
            for token, length in self.dry_matches().items():
                if length >= p.dry_allowed_length:
                    logits[token] -= p.dry_multiplier * p.dry_base ** (length - p.dry_allowed_length)
        return logits

    def dry_matches(self) -> dict[int, int]:
        """For each token that would extend a repetition, the length of the longest one it extends: ``n`` where the
        window's last ``n`` tokens also occur earlier followed by that token, with no sequence breaker among them."""
        p = self.penalties
        window = self.tokens if p.dry_penalty_last_n == -1 else self.tokens[-p.dry_penalty_last_n :]
        end = len(window) - 1
        if end < p.dry_allowed_length:
            return {}
        longest = 0  # tokens at the end of the window up to the newest breaker
        while longest < min(len(window), _LONGEST_DRY_MATCH) and not self._breaks_sequence(window[end - longest]):
            longest += 1
        matches: dict[int, int] = {}
        if longest == 0:
            return matches
        last = window[end]
        for j in _positions(window, last, end):
            length = 1
            while length < longest and j - length >= 0 and window[j - length] == window[end - length]:
                length += 1
            following = window[j + 1]
            matches[following] = max(matches.get(following, 0), length)
        return matches

    def _breaks_sequence(self, token: int) -> bool:
        if token not in self._breaks:
            text = self._token_text(token)
            self._breaks[token] = any(b in text for b in self.penalties.dry_sequence_breakers)
        return self._breaks[token]


def _positions(window: Sequence[int], token: int, end: int) -> list[int]:
    """Where ``token`` occurs in ``window`` before index ``end``."""
    return [j for j in range(end) if window[j] == token]
