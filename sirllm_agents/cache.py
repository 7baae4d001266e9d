"""The bounded KV cache: per-layer keys and values plus what SirLLM needs to know about each cached token.

Knows nothing of chat. The model appends keys and values through ``kv`` (a transformers ``DynamicCache``) during its
forward; the caller then records the tokens with ``append``. The token records are the source of truth: a forward
interrupted halfway leaves some layers longer than the records, and ``truncate`` cuts every layer back to them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .policies import CachedTokens, Policy
from .rope import KeyRotator
from .token_shapes import TokenShapes


class SirLLMCache:
    """At most ``cache_size`` tokens; when full, ``policy`` chooses who stays and kept keys are re-rotated.

    Per cached token it records the token id, its score (token entropy, decayed each turn), its position in the
    whole conversation (``positions``, never reset by eviction), the turn it came from, and whether the chat template
    wrote it (``template``).
    """

    def __init__(self, rotator: KeyRotator, policy: Policy, cache_size: int, shapes: TokenShapes):
        self.rotator = rotator
        self.policy = policy
        self.cache_size = cache_size
        self.shapes = shapes
        self.kv = DynamicCache()
        self.token_ids = torch.empty(0, dtype=torch.long)
        self.scores = torch.empty(0, dtype=torch.float32)
        self.positions = torch.empty(0, dtype=torch.long)
        self.turns = torch.empty(0, dtype=torch.long)
        self.template = torch.empty(0, dtype=torch.bool)  # written by the chat template, not a message's text
        # Every token ingested, by conversation position, evicted or not (rolled-back ones are cut off): what the
        # memory view shows greyed out, and how evictions are counted per turn. Four bytes a token each.
        self.history_ids = torch.empty(0, dtype=torch.int32)
        self.history_turns = torch.empty(0, dtype=torch.int32)

    def __len__(self) -> int:
        return self.token_ids.numel()

    @property
    def max_chunk(self) -> int:
        """The most tokens one forward may add: room must stay for the sinks and the protected recent tokens."""
        return self.cache_size - self.policy.start_size - self.policy.recent_size

    def make_room(self, n: int, slack: int = 0) -> int:
        """Evict so that ``n`` more tokens fit; when evicting anyway, free ``slack`` extra slots so the next few
        single-token appends (decoding) do not each pay for an eviction. Returns the number of tokens evicted."""
        if n > self.max_chunk:
            raise ValueError(f"cannot add {n} tokens at once to a cache of {self.cache_size} (at most {self.max_chunk})")
        if len(self) + n <= self.cache_size:
            return 0
        budget = self.cache_size - min(n + slack, self.max_chunk)
        word_start, sentence_end = self.shapes.of(self.token_ids)
        tokens = CachedTokens(self.scores, self.template, word_start, sentence_end)
        return self._retain(self.policy.keep(tokens, budget).to(torch.long))

    def _retain(self, keep: torch.Tensor) -> int:
        evicted = len(self) - keep.numel()
        delta = torch.arange(keep.numel()) - keep
        moved = delta != 0
        new_layers = []
        for i, layer in enumerate(self.kv.layers):
            idx = keep.to(layer.keys.device)
            keys, values = layer.keys[:, :, idx], layer.values[:, :, idx]
            if moved.any():
                keys[:, :, moved] = self.rotator.rotate(keys[:, :, moved], delta[moved], layer=i)
            new_layers.append((keys, values))
        # Swap all layers only once every new tensor exists, so an interrupt cannot leave the layers disagreeing.
        for layer, (keys, values) in zip(self.kv.layers, new_layers):
            layer.keys, layer.values = keys, values
        self.token_ids, self.scores = self.token_ids[keep], self.scores[keep]
        self.positions, self.turns, self.template = self.positions[keep], self.turns[keep], self.template[keep]
        return evicted

    def append(
        self, token_ids: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, turn: int, template: torch.Tensor
    ) -> None:
        """Record tokens whose keys and values the model has just appended to ``kv``."""
        self.token_ids = torch.cat((self.token_ids, token_ids.cpu()))
        self.scores = torch.cat((self.scores, scores.detach().float().cpu()))
        self.positions = torch.cat((self.positions, positions.cpu()))
        self.turns = torch.cat((self.turns, torch.full((token_ids.numel(),), turn, dtype=torch.long)))
        self.template = torch.cat((self.template, template.to(torch.bool).cpu()))
        # A token fed again (see `drop_newest`) is in the history already; only positions past its end extend it.
        new = positions.cpu() >= len(self.history_ids)
        self.history_ids = torch.cat((self.history_ids, token_ids.cpu()[new].to(torch.int32)))
        self.history_turns = torch.cat((self.history_turns, torch.full((int(new.sum()),), turn, dtype=torch.int32)))

    def truncate(self, position: int) -> None:
        """Drop every token from conversation position ``position`` on (they are the newest), and any keys and
        values a broken forward appended without a record."""
        self._keep_oldest(int((self.positions < position).sum()))
        self.history_ids, self.history_turns = self.history_ids[:position], self.history_turns[:position]

    def drop_newest(self) -> None:
        """Drop the newest cached token's keys, values and record, to feed it again; the history keeps it."""
        self._keep_oldest(len(self) - 1)

    def _keep_oldest(self, n: int) -> None:
        for layer in self.kv.layers:
            if layer.keys is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
        self.token_ids, self.scores = self.token_ids[:n], self.scores[:n]
        self.positions, self.turns, self.template = self.positions[:n], self.turns[:n], self.template[:n]

    def copy(self) -> SirLLMCache:
        """A copy sharing no tensor with this cache (the rotator, policy and shapes, which never change, are shared)."""
        twin = SirLLMCache(self.rotator, self.policy, self.cache_size, self.shapes)
        for i, layer in enumerate(self.kv.layers):
            if layer.keys is not None and layer.keys.numel():
                twin.kv.update(layer.keys.clone(), layer.values.clone(), i)
        for name in ("token_ids", "scores", "positions", "turns", "template", "history_ids", "history_turns"):
            setattr(twin, name, getattr(self, name).clone())
        return twin

    def decay(self, ratio: float) -> None:
        """Multiply every stored score by ``ratio`` (SirLLM's per-turn decay, so old key tokens can fade)."""
        self.scores *= ratio
