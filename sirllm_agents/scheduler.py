"""The one scheduling point of a model: every forward of every conversation on it goes through its
:class:`Scheduler`, which runs the forwards that conversations ask for at the same time in batched calls of the
backend (``decode_together``): continuous batching, where a conversation joins or leaves between two steps.

A request (one call on a session) is admitted first: at most ``max_running`` run at once, the others wait in turn.
Each running request works in its own thread; when it needs the model it hands its tokens over and waits. A step
runs once every running request is waiting on one, or ``gather_seconds`` after the oldest asked (so a request busy
elsewhere, rendering a long prompt, holds the others up only that long), and the thread that finds it ready runs it
for all. Alone, a request runs its own forwards at once. A request handing a piece of its reply to its caller is
not waited for. A long input takes at most the backend's ``step_tokens`` per step, so a prompt being prefilled
delays the others' next token by one chunk, not by the whole prompt. Without batching (``batching=False``), admission
still bounds the requests, and each runs its forwards at once in its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .runners import Backend, ModelRunner

DEFAULT_PARALLEL = 4  # requests run at once
GATHER_SECONDS = 0.01


@dataclass(eq=False)
class _Forward:
    """One request's tokens for the model, run over one or more steps."""

    runner: ModelRunner
    ids: list[int]
    asked: float
    start_length: int
    done: int = 0  # tokens run so far
    scores: list[torch.Tensor] = field(default_factory=list)
    error: Exception | None = None
    finished: bool = False

    def next_chunk(self, limit: int | None) -> list[int]:
        return self.ids[self.done :] if limit is None else self.ids[self.done : self.done + limit]

    def advance(self, tokens: int, scores: torch.Tensor) -> None:
        self.done += tokens
        self.scores.append(scores)
        self.finished = self.done == len(self.ids)

    def fail(self, error: Exception) -> None:
        self.undo()
        self.error, self.finished = error, True

    def undo(self) -> None:
        """Leave the runner as before this forward: nothing of it counted as cached."""
        if len(self.runner) > self.start_length:
            self.runner.truncate(self.start_length)


class Ticket:
    """A running request's place in the scheduler (see :meth:`Scheduler.request`)."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        self.is_away = False

    @contextmanager
    def away(self) -> Iterator[None]:
        """While the request hands a result to its caller, and asks nothing of the model, no step waits for it."""
        with self._scheduler._changed():
            self.is_away = True
        try:
            yield
        finally:
            with self._scheduler._changed():
                self.is_away = False


class EngineBusyError(RuntimeError):
    """More requests are waiting for the model than the scheduler's ``max_waiting``: retry later."""


class Scheduler:
    """Admits requests and runs their forwards together (see the module docstring). ``max_running``: requests run
    at once (their decode steps share one batched forward); ``max_waiting``: requests that may wait for a place,
    past which :meth:`request` raises :class:`EngineBusyError` (None: no bound). With ``batching=False`` each
    forward runs at once in its request's thread, concurrently with the others' (admission still bounds them)."""

    def __init__(
        self,
        backend: Backend,
        max_running: int = DEFAULT_PARALLEL,
        max_waiting: int | None = None,
        gather_seconds: float = GATHER_SECONDS,
        batching: bool = True,
    ):
        if not isinstance(max_running, int) or max_running < 1:
            raise ValueError(f"max_running must be a positive integer, got {max_running!r}")
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 or None, got {max_waiting!r}")
        self.backend = backend
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.gather_seconds = gather_seconds
        self.batching = batching
        self._cond = threading.Condition()
        self._running: list[Ticket] = []
        self._waiting = 0
        self._pending: list[_Forward] = []
        self._stepping = False
        self._held = threading.local()  # tickets held by this thread
        self.calls = 0  # calls into the backend
        self.forwards = 0  # forwards (one per conversation per step) run in them

    @property
    def running(self) -> int:
        """Requests admitted and not finished."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests waiting for a place."""
        return self._waiting

    @contextmanager
    def request(self) -> Iterator[Ticket]:
        """Admit one request for the ``with`` block: waits while ``max_running`` run. A thread that already runs a
        request is admitted at once (it could otherwise wait on itself)."""
        held = getattr(self._held, "tickets", 0)
        ticket = Ticket(self)
        with self._cond:
            if held == 0 and len(self._running) >= self.max_running:
                if self.max_waiting is not None and self._waiting >= self.max_waiting:
                    raise EngineBusyError(
                        f"the model is busy: {len(self._running)} requests running and {self._waiting} waiting "
                        f"(at most {self.max_waiting}); retry later"
                    )
                self._waiting += 1
                try:
                    while len(self._running) >= self.max_running:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
            self._running.append(ticket)
        self._held.tickets = held + 1
        try:
            yield ticket
        finally:
            self._held.tickets = max(0, getattr(self._held, "tickets", 0) - 1)
            with self._changed():
                self._running.remove(ticket)

    def ingest(self, runner: ModelRunner, ids: Sequence[int]) -> torch.Tensor:
        """``runner.ingest(ids)``, run in a step together with the other requests' forwards."""
        if len(ids) == 0:
            return torch.empty(0)
        if not self.batching:
            with self._cond:
                self.calls += 1
                self.forwards += 1
            return runner.ingest(ids)
        forward = _Forward(runner, [int(token) for token in ids], time.monotonic(), len(runner))
        with self._changed():
            self._pending.append(forward)
        while True:
            with self._cond:
                while not forward.finished and not self._ready():
                    self._cond.wait(None if self._stepping else self._gather_left())
                if forward.finished:
                    break
                batch, self._pending, self._stepping = self._pending, [], True
            try:
                self._step(batch)
            except BaseException:  # an interrupt in this thread: the others' forwards wait for the next step
                with self._changed():
                    if not forward.finished:
                        forward.undo()
                    self._pending = [f for f in batch if not f.finished and f is not forward] + self._pending
                    self._stepping = False
                raise
            unfinished = [f for f in batch if not f.finished]
            now = time.monotonic()
            for left in unfinished:
                left.asked = now  # a long input goes on in the next step, with the others' next tokens
            with self._changed():
                self._pending = unfinished + self._pending
                self._stepping = False
        if forward.error is not None:
            raise forward.error
        return torch.cat(forward.scores)

    @contextmanager
    def _changed(self) -> Iterator[None]:
        """Change the scheduler's state; waiting threads then look again."""
        with self._cond:
            yield
            self._cond.notify_all()

    def _ready(self) -> bool:
        if self._stepping or not self._pending:
            return False
        active = sum(not ticket.is_away for ticket in self._running)
        return len(self._pending) >= active or self._gather_left() == 0

    def _gather_left(self) -> float:
        oldest = min(f.asked for f in self._pending)
        return max(0.0, oldest + self.gather_seconds - time.monotonic())

    def _step(self, batch: list[_Forward]) -> None:
        groups: dict[Hashable, list[_Forward]] = {}
        for forward in batch:
            key = self.backend.batch_key(forward.runner, len(forward.ids) - forward.done)
            groups.setdefault(key, []).append(forward)
        for group in groups.values():
            self._run(group)

    def _run(self, group: list[_Forward]) -> None:
        chunks = [forward.next_chunk(self.backend.step_tokens) for forward in group]
        try:
            if len(group) == 1:
                scores = [group[0].runner.ingest(chunks[0])]
            else:
                scores = self.backend.decode_together([forward.runner for forward in group], chunks)
        except Exception as error:
            if len(group) == 1:
                group[0].fail(error)
                return
            for forward in group:  # each alone, so only a bad input fails (the batch changed no runner)
                self._run([forward])
            return
        self.calls += 1
        self.forwards += len(group)
        for forward, chunk, chunk_scores in zip(group, chunks, scores):
            forward.advance(len(chunk), chunk_scores)
