"""Decoding: sampling settings, choosing the next token, turning tokens into reply text, and the decode loop.

The loop knows nothing of the cache: the session hands it a function that feeds a sampled token into its evicting
cache and returns the logits that score the next one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tokenizers.decoders import DecodeStream

from .penalties import CONSTRAINED_PENALTIES, NO_PENALTIES, Penalties, RepetitionPenalty

if TYPE_CHECKING:
    from .model import Model


@dataclass
class GenerationConfig:
    """How to decode one reply. ``temperature=0`` is greedy; ``seed`` makes sampling repeatable.

    The repetition penalties (see :mod:`sirllm_agents.penalties`) left at ``None`` take the reply's default: none for
    free text, :data:`~sirllm_agents.penalties.CONSTRAINED_PENALTIES` for a grammar-constrained reply (a tool call or
    a ``response_format``). One given overrides that default field by field."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        self.penalties(constrained=False)  # checks the values given

    @classmethod
    def of(cls, config: GenerationConfig | None = None, **options: Any) -> GenerationConfig:
        """``config`` (default: the defaults) with the ``options`` given replacing some of its fields; an option left
        at ``None`` keeps the field's value. Every caller takes its decoding defaults from here. Raises ValueError
        naming an option that is not a field."""
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown decoding options {unknown}: expected GenerationConfig fields")
        return dataclasses.replace(config or cls(), **{k: v for k, v in options.items() if v is not None})

    def penalties(self, constrained: bool) -> Penalties:
        """The repetition penalties of a reply: the values given over the default of its kind."""
        given = {name: getattr(self, name) for name in Penalties.names() if getattr(self, name) is not None}
        return dataclasses.replace(CONSTRAINED_PENALTIES if constrained else NO_PENALTIES, **given)


class TokenConstraint(Protocol):
    """Restricts decoding to a grammar (a JSON schema for tool calls and structured output).

    The decode loop calls ``mask`` on each row of logits before sampling (disallowed tokens set to ``-inf``; once the
    grammar is complete only end-of-turn tokens stay allowed), then ``accept`` with the sampled token, and stops when
    ``is_finished()`` is true.
    """

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token_id: int) -> None: ...

    def is_finished(self) -> bool: ...


class ClosableConstraint(TokenConstraint, Protocol):
    """A constraint whose value can be closed early (see :class:`ClosingWithinBudget`): ``closing`` gives the tokens
    that would finish it after the reply's tokens (None when unknown), ``can_close_with`` whether the grammar takes
    them from where it is, and ``closed_at_limit`` records that the reply was closed so."""

    closed_at_limit: bool

    def closing(self, token_ids: list[int]) -> list[int] | None: ...

    def can_close_with(self, tokens: list[int]) -> bool: ...


class ClosingWithinBudget:
    """Makes a constrained reply end as a whole value within ``max_new_tokens``: before each sampled token is kept
    it checks that the value could still be closed in the tokens left after it; when it could not, the closing of
    the reply so far is written instead, token by token (checked by the grammar first). A closing that does not fit
    or is not known leaves the reply to the limit, which then cuts it off (``finish_reason="length"``)."""

    # With no closing known for a candidate token (a state the closer does not read), go on only while this many
    # tokens more than the known closing are left.
    MARGIN = 8

    def __init__(self, constraint: ClosableConstraint):
        self.constraint = constraint
        self.closing = constraint.closing([])
        self.forced: list[int] = []

    def choose(self, token_ids: list[int], candidate: int, remaining: int) -> int:
        """The token to write: ``candidate``, or the first of the closing when ``candidate`` would leave too few
        tokens to close the value (``remaining`` counts this one)."""
        after = self.constraint.closing([*token_ids, candidate])
        if after is not None and len(after) <= remaining - 1:
            self.closing = after
            return candidate
        closing = self.closing
        close_now = (
            closing is not None
            and len(closing) <= remaining
            and (after is not None or remaining - 1 <= len(closing) + self.MARGIN)
            and self.constraint.can_close_with(closing)
        )
        if not close_now:
            self.closing = after
            return candidate
        self.constraint.closed_at_limit = True
        self.forced = list(closing)
        return self.forced.pop(0)


def _forces_text(constraint: TokenConstraint) -> bool:
    """Whether the grammar allows only one text next (``forces_text``, when the constraint can tell)."""
    forces = getattr(constraint, "forces_text", None)
    return forces is not None and forces()


class Sampler:
    """Picks the next token from a row of logits: argmax when greedy, else temperature / top-k / top-p sampling."""

    def __init__(self, config: GenerationConfig, device: torch.device):
        self.config = config
        self.generator = None
        if config.temperature > 0:
            self.generator = torch.Generator(device=device)
            if config.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(config.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.generator is None:
            return int(logits.argmax())
        logits = logits / self.config.temperature
        if self.config.top_k:
            kth = logits.topk(min(self.config.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if self.config.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.config.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


class ReplyText:
    """Builds the reply text token by token: whole UTF-8 characters only, stop strings cut off and never shown."""

    def __init__(self, tokenizer, stop: list[str]):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = stop
        self._held = max((len(s) - 1 for s in stop), default=0)
        self.text = ""  # everything decoded so far (including a stop string once found)
        self.shown = 0  # characters of ``text`` handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to show (possibly empty)."""
        piece = self._stream.step(self._backend, token_id)
        if piece:
            self.text += piece
            if self._stop:
                start = max(0, self.shown - self._held)
                hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
                if hits:
                    self.text = self.text[: min(hits)]
                    self.stopped = True
                    return self._show(len(self.text))
        return self._show(len(self.text) - self._unsafe_tail())

    def finish(self) -> str:
        """The rest of the text once decoding has ended."""
        return self._show(len(self.text))

    def _unsafe_tail(self) -> int:
        """Length of the longest end of ``text`` that could still grow into a stop string."""
        for n in range(min(self._held, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _show(self, end: int) -> str:
        piece = self.text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece


class Decoding:
    """One reply's decode loop: sample (under ``constraint``, if any), stop on an end-of-turn token, a stop string,
    a finished grammar or ``max_new_tokens``, else feed the token and go on. Iterating yields the reply's text as it
    grows (see :class:`ReplyText`); afterwards ``text``, ``finish_reason`` and ``token_ids`` hold the result."""

    def __init__(
        self,
        model: Model,
        logits: torch.Tensor,
        feed: Callable[[int], torch.Tensor],
        config: GenerationConfig,
        constraint: TokenConstraint | None,
    ):
        self.model, self.logits, self.feed, self.config, self.constraint = model, logits, feed, config, constraint
        self.text = ""
        self.finish_reason = "length"
        self.token_ids: list[int] = []

    def __iter__(self) -> Iterator[str]:
        sampler = Sampler(self.config, self.logits.device)
        text = ReplyText(self.model.tokenizer, self.config.stop)
        constraint, logits = self.constraint, self.logits
        penalize = RepetitionPenalty(self.config.penalties(constraint is not None), self._token_text)
        closing = ClosingWithinBudget(constraint) if getattr(constraint, "closing", None) is not None else None
        for step in range(self.config.max_new_tokens):
            # Penalties steer only where the grammar leaves a choice: text it forces (keys, punctuation) is neither
            # penalised, which would only push the model to odd spellings of the same text, nor counted.
            chosen = constraint is None or not _forces_text(constraint)
            if closing is not None and closing.forced:
                token, chosen = closing.forced.pop(0), False
            else:
                scores = (
                    penalize(logits) if chosen else logits
                )  # before the grammar's mask: penalties steer, it decides
                token = sampler(scores if constraint is None else constraint.mask(scores))
                if closing is not None and token not in self.model.stop_token_ids:
                    token = closing.choose(self.token_ids, token, self.config.max_new_tokens - step)
            if chosen:
                penalize.accept(token)
            if constraint is not None:
                constraint.accept(token)
            if token in self.model.stop_token_ids:
                self.finish_reason = "stop"
                break
            self.token_ids.append(token)
            logits = self.feed(token)
            if piece := text.push(token):
                yield piece
            if text.stopped or (constraint is not None and constraint.is_finished()):
                self.finish_reason = "stop"
                break
            if closing is not None and constraint.closed_at_limit and not closing.forced:
                self.finish_reason = "stop"  # the closing is written: the value is whole
                break
        if piece := text.finish():
            yield piece
        self.text = text.text

    def _token_text(self, token: int) -> str:
        return self.model.tokenizer.decode([token])
