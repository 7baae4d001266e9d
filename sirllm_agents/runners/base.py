"""The seam between a session and the weights: a backend loads them once, a runner holds one conversation's state.

A session never touches keys, values or logits itself. It asks its runner to ingest tokens (at the next cache
indices, since positions are cache indices), to keep a subset of the cached tokens (moving them to their new
indices), to cut the newest off, and to export or import its state. A second backend needs no change in the session,
the policies, the tools or the adapters.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol

import torch


class ModelRunner(Protocol):
    """One conversation's model state: the keys and values of the tokens it holds, in cache order, and the logits
    after the newest of them."""

    logits: torch.Tensor | None
    """float32 [vocab]: the model's output after the newest cached token (what scores the next one); None when
    unknown (after ``truncate``)."""

    def __len__(self) -> int: ...

    def ingest(self, ids: Sequence[int]) -> torch.Tensor:
        """Append ``ids`` at the next cache indices and return each one's surprisal ``-log p(id | everything
        before)`` (float32, on the CPU): the first from ``logits`` (``inf`` when there are none), the others from
        this forward. Sets ``logits`` to the output after the last. On an exception nothing is counted as cached
        (a later ``truncate`` removes any half-written state)."""
        ...

    def retain(self, keep: torch.Tensor) -> None:
        """Keep only the cached tokens at indices ``keep`` (ascending); each moves to its index in ``keep``, with its
        key re-rotated to that position."""
        ...

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached tokens (and drop any state past them); ``logits`` becomes None."""
        ...

    def copy(self) -> ModelRunner:
        """An independent copy."""
        ...

    def state(self) -> dict[str, torch.Tensor]:
        """The cached state as named tensors (for a session file)."""
        ...

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the state ``state()`` exported (by a runner of the same backend and weights)."""
        ...


class Backend(Protocol):
    """Weights loaded once, shared by every runner made from them."""

    name: str  # "torch" or "llamacpp"
    max_length: int  # positions the model was trained on
    vocab_size: int  # rows of its logits
    step_tokens: int | None  # the most tokens of one input a scheduler's step runs (None: the whole input)
    can_batch: bool  # whether decode_together can take several runners' inputs in one forward

    def new_runner(self, capacity: int) -> ModelRunner:
        """A runner for one conversation that will never hold more than ``capacity`` tokens."""
        ...

    def eos_token_ids(self) -> set[int]:
        """The end-of-generation token ids the weights' own config names."""
        ...

    def identity(self) -> dict[str, Any]:
        """What a cached state is only valid for: the architecture, dtype and a fingerprint of the weights."""
        ...

    def batch_key(self, runner: ModelRunner, tokens: int) -> Hashable:
        """Inputs (``tokens`` long) of runners with equal keys may be decoded together."""
        ...

    def decode_together(self, runners: Sequence[ModelRunner], tokens: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """``runners[i].ingest(tokens[i])`` for every ``i``, in batched forwards: each runner's surprisals and logits
        as its own ``ingest`` gives them. A bad input raises before any runner changes, naming the runner."""
        ...


def surprisal(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log softmax(logits)[target]`` per row, without materializing the log-softmax."""
    return logits.logsumexp(-1) - logits.gather(-1, targets[:, None].to(logits.device))[:, 0]


def batch_inputs(
    runners: Sequence[ModelRunner], tokens: Sequence[Sequence[int]], vocab_size: int, names: Sequence[str]
) -> list[list[int]]:
    """``tokens`` as lists of ints, after checking what every backend's ``decode_together`` needs: one list per
    runner, no runner twice, every id in the vocabulary. Errors name the runner (``names[i]``)."""
    if len(runners) != len(tokens):
        raise ValueError(f"{len(runners)} runners but {len(tokens)} token lists: give one list per runner")
    seen: set[int] = set()
    ids = []
    for runner, chunk, name in zip(runners, tokens, names):
        if id(runner) in seen:
            raise ValueError(f"{name} appears twice: give each runner once, with all its tokens")
        seen.add(id(runner))
        chunk = [int(token) for token in chunk]
        bad = [token for token in chunk if not 0 <= token < vocab_size]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary (0-{vocab_size - 1})")
        ids.append(chunk)
    return ids
