"""The bounded cache: what SirLLM records of each cached token, the budget, and eviction.

Knows nothing of chat, nor of how keys and values are stored: a :class:`~sirllm_agents.runners.ModelRunner` holds
those. The token records here are the source of truth: a forward broken midway is cut back to them by ``truncate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .history import TokenHistory
from .policies import CachedTokens, Policy
from .runners import ModelRunner
from .token_shapes import TokenShapes

_RECORDS = ("token_ids", "scores", "positions", "turns", "template")

Forward = Callable[[ModelRunner, Sequence[int]], torch.Tensor]  # runs ids through a runner: their surprisals


class SirLLMCache:
    """At most ``cache_size`` tokens; when full, the first ``start_size`` (attention sinks) and the newest
    ``recent_size`` stay, ``policy`` ranks the rest for the remaining room, and the runner moves who stays.

    Per cached token it records the token id, its score (token entropy, decayed each turn), its position in the
    whole conversation (``positions``, never reset by eviction), the turn it came from, and whether the chat template
    wrote it (``template``). ``forward`` runs the model (default: ``runner.ingest``; a session passes its model's
    scheduler, which batches it with other conversations' forwards).
    """

    def __init__(
        self,
        runner: ModelRunner,
        policy: Policy,
        cache_size: int,
        shapes: TokenShapes,
        *,
        start_size: int = 0,
        recent_size: int = 0,
        history_window: int | None = None,
        forward: Forward | None = None,
    ):
        self.runner = runner
        self.forward: Forward = forward or _ingest
        self.policy = policy
        self.cache_size, self.start_size, self.recent_size = cache_size, start_size, recent_size
        self.shapes = shapes
        self.token_ids = torch.empty(0, dtype=torch.long)
        self.scores = torch.empty(0, dtype=torch.float32)
        self.positions = torch.empty(0, dtype=torch.long)
        self.turns = torch.empty(0, dtype=torch.long)
        self.template = torch.empty(0, dtype=torch.bool)
        # Every token ingested (the newest history_window of them, or all), evicted or not; rolled-back ones are cut
        # off. The memory view reads it.
        self.history = TokenHistory(history_window)

    def __len__(self) -> int:
        return self.token_ids.numel()

    @property
    def history_ids(self) -> torch.Tensor:
        """Token ids of the recorded history, from conversation position ``history.start`` on."""
        return self.history.ids

    @property
    def history_turns(self) -> torch.Tensor:
        return self.history.turns

    @property
    def logits(self) -> torch.Tensor | None:
        """The model's output after the newest cached token (None after a rollback)."""
        return self.runner.logits

    @property
    def max_chunk(self) -> int:
        """The most tokens one forward may add: room must stay for the sinks and the protected recent tokens."""
        return self.cache_size - self.start_size - self.recent_size

    def make_room(self, n: int, slack: int = 0) -> int:
        """Evict so that ``n`` more tokens fit; when evicting anyway, free ``slack`` extra slots so the next few
        single-token appends (decoding) do not each pay for an eviction. Returns the number of tokens evicted."""
        if n > self.max_chunk:
            raise ValueError(
                f"cannot add {n} tokens at once to a cache of {self.cache_size} (at most {self.max_chunk})"
            )
        if len(self) + n <= self.cache_size:
            return 0
        budget = self.cache_size - min(n + slack, self.max_chunk)
        shapes = self.shapes.of(self.token_ids)
        tokens = CachedTokens(self.scores, self.template, *shapes, self.token_ids)
        keep = self.policy.keep(tokens, budget, self.start_size, self.recent_size)
        keep = keep.to(torch.long)
        self.runner.retain(keep)
        evicted = len(self) - keep.numel()
        for name in _RECORDS:
            setattr(self, name, getattr(self, name)[keep])
        return evicted

    def ingest(self, ids: Sequence[int], positions: Sequence[int], turn: int, template: Sequence[bool]) -> None:
        """Run ``ids`` through the model into the cache and record them, each scored by its surprisal."""
        scores = self.forward(self.runner, ids)
        self._record(torch.tensor(list(ids)), scores, torch.tensor(list(positions)), turn, torch.tensor(list(template)))

    def refeed_newest(self, ids: Sequence[int], positions: Sequence[int], turn: int, template: Sequence[bool]) -> None:
        """Like :meth:`ingest` after a rollback, when the logits after the newest cached token are gone: that token
        is fed again first (keeping its score, record and place in the history) so its logits score ``ids[0]``. When
        eviction took the conversation's last token, the newest cached one stands in for it."""
        kept = {name: getattr(self, name)[-1:] for name in _RECORDS}
        self._keep_oldest(len(self) - 1)
        scores = self.forward(self.runner, [int(kept["token_ids"][0]), *ids])
        scores[0] = kept["scores"][0]
        self._record(
            torch.cat((kept["token_ids"], torch.tensor(list(ids), dtype=torch.long))),
            scores,
            torch.cat((kept["positions"], torch.tensor(list(positions), dtype=torch.long))),
            turn,
            torch.cat((kept["template"], torch.tensor(list(template), dtype=torch.bool))),
            kept_turn=int(kept["turns"][0]),
        )

    def _record(
        self,
        token_ids: torch.Tensor,
        scores: torch.Tensor,
        positions: torch.Tensor,
        turn: int,
        template: torch.Tensor,
        kept_turn: int | None = None,
    ) -> None:
        turns = torch.full((token_ids.numel(),), turn, dtype=torch.long)
        if kept_turn is not None:
            turns[0] = kept_turn
        self.token_ids = torch.cat((self.token_ids, token_ids.to(torch.long)))
        self.scores = torch.cat((self.scores, scores.float()))
        self.positions = torch.cat((self.positions, positions))
        self.turns = torch.cat((self.turns, turns))
        self.template = torch.cat((self.template, template.to(torch.bool)))
        self.history.extend(token_ids, positions, turn)

    def probe(self, ids: Sequence[int], position: int) -> float:
        """``-log p(ids | the cached tokens)``, were ``ids`` to follow them at conversation position ``position``:
        all but the last are run and cut off again, and the logits after the newest cached token are restored."""
        logits = self.logits
        if logits is None:
            raise RuntimeError("probe needs the logits after the newest cached token: ingest before probing")
        if len(ids) == 1:
            return _surprisal(logits, ids[0])
        run = len(ids) - 1
        self.ingest(ids[:-1], range(position, position + run), turn=-1, template=[False] * run)
        # The forward recorded each run token's surprisal (the first from the logits before it); its last logits
        # score the last token.
        surprisal = float(self.scores[-run:].sum()) + _surprisal(self.logits, ids[-1])
        self.truncate(position)
        self.runner.logits = logits
        return surprisal

    def truncate(self, position: int) -> None:
        """Drop every token from conversation position ``position`` on (they are the newest), and any state a broken
        forward left in the runner without a record."""
        self._keep_oldest(int((self.positions < position).sum()))
        self.history.truncate(position)

    def _keep_oldest(self, n: int) -> None:
        self.runner.truncate(n)
        for name in _RECORDS:
            setattr(self, name, getattr(self, name)[:n])

    def decay(self, ratio: float) -> None:
        """Multiply every stored score by ``ratio`` (SirLLM's per-turn decay, so old key tokens can fade)."""
        self.scores *= ratio

    def copy(self) -> SirLLMCache:
        """A copy sharing no state with this cache (the policy and shapes, which never change, are shared)."""
        bound = {"start_size": self.start_size, "recent_size": self.recent_size}
        twin = SirLLMCache(self.runner.copy(), self.policy, self.cache_size, self.shapes, **bound, forward=self.forward)
        for name in _RECORDS:
            setattr(twin, name, getattr(self, name).clone())
        twin.history = self.history.copy()
        return twin

    def records(self) -> dict[str, torch.Tensor]:
        """The per-token records as named tensors (for a session file)."""
        return {f"cache.{name}": getattr(self, name) for name in _RECORDS} | {
            "history.ids": self.history.ids,
            "history.turns": self.history.turns,
            "history.start": torch.tensor([self.history.start], dtype=torch.int64),
        }

    def load_records(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in _RECORDS:
            setattr(self, name, tensors[f"cache.{name}"])
        self.history.load(int(tensors["history.start"][0]), tensors["history.ids"], tensors["history.turns"])


def _ingest(runner: ModelRunner, ids: Sequence[int]) -> torch.Tensor:
    return runner.ingest(ids)


def _surprisal(logits: torch.Tensor, token: int) -> float:
    return float(logits.logsumexp(-1) - logits[token])
