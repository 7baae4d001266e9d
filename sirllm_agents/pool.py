"""The engine's pool of conversations: which session a call goes to, and which sessions stay in memory.

A call names its session (``session_id``) or is routed to the session whose transcript is the longest prefix of its
messages, a conversation-level prefix cache; with no match a new session starts. At most ``max_live_sessions`` stay
in memory: the least recently used idle one is written to the pool's :class:`~sirllm_agents.store.SessionStore` (a
private folder by default) and read back when its conversation returns, so it continues exactly as if it had stayed.
Past ``max_spilled_sessions`` files, the longest idle one is deleted.

With a shared store (:class:`~sirllm_agents.store.SharedDirectoryStore`) several processes serve one set of
conversations: a session is in one process's memory only while that process holds its lease; asking another process
for it by id raises :class:`~sirllm_agents.store.SessionBusyError` until the holder spills it (when idle, on
:meth:`SessionPool.spill_idle` or :meth:`SessionPool.spill_all`) or its lease expires.

Thread safety: the pool's own lock guards only its bookkeeping, never a model call. A session in a call is pinned
and never spilled; calls on one session are serialized by the session's lock, calls on different sessions run
concurrently.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import SessionConfig
from .persistence import SessionFileError
from .replies import messages_as_held
from .session import Session
from .store import DirectoryStore, SessionBusyError, SessionStore
from .tools import normalize_tools
from .transcript import Transcript

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger(__name__)


@dataclass
class _Spilled:
    """A session written to the store, with what routing needs to find it again."""

    transcript: Transcript


class SessionPool:
    """Sessions on one model, by id. Use it through ``Engine.chat`` / ``Engine.stream`` / ``Engine.route``."""

    def __init__(
        self,
        model: Model,
        *,
        max_live_sessions: int,
        max_spilled_sessions: int,
        spill_dir: str | os.PathLike | None,
        config: SessionConfig,
        store: SessionStore | None = None,
    ):
        if not isinstance(max_live_sessions, int) or max_live_sessions < 1:
            raise ValueError(f"max_live_sessions must be a positive integer, got {max_live_sessions!r}")
        if not isinstance(max_spilled_sessions, int) or max_spilled_sessions < 0:
            raise ValueError(f"max_spilled_sessions must be a non-negative integer, got {max_spilled_sessions!r}")
        self.model = model
        self.max_live_sessions = max_live_sessions
        self.max_spilled_sessions = max_spilled_sessions
        self.config = config.sized(model.max_length)  # checked against the model now rather than at the first call
        if store is not None and spill_dir is not None:
            raise ValueError("give spill_dir or store, not both (a DirectoryStore(spill_dir) is the spill_dir)")
        self.store = store if store is not None else DirectoryStore(spill_dir)
        self._live: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._spilled: dict[str, _Spilled] = {}  # longest idle first
        self._pins: Counter[str] = Counter()
        self._last_used: dict[str, float] = {}  # live session id -> time.monotonic() of its last call's end
        self._lock = threading.Lock()

    # -- routing --------------------------------------------------------------------------------------------------

    @contextmanager
    def use(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict] | None = None,
        session_id: str | None = None,
        config: SessionConfig | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> Iterator[Session]:
        """The session for a call, pinned in memory until the block ends."""
        session = self.route(messages, tools, session_id, config, response_format, pin=True)
        try:
            yield session
        finally:
            with self._lock:
                self._pins[session.session_id] -= 1
                if self._pins[session.session_id] <= 0:
                    del self._pins[session.session_id]
                self._last_used[session.session_id] = time.monotonic()
                self._shrink()

    def route(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict] | None = None,
        session_id: str | None = None,
        config: SessionConfig | None = None,
        response_format: Mapping[str, Any] | None = None,
        *,
        pin: bool = False,
    ) -> Session:
        """The session ``session_id`` names (created when new; ``messages`` are then not read), else the one whose
        transcript is the longest prefix of ``messages`` (rendered with the same ``tools``), else a new one. Spilled
        sessions are read back. A session made here takes ``config`` (default: the pool's); one that exists keeps
        its own settings. With a ``response_format`` the messages are matched as the session holds them (see
        :func:`~sirllm_agents.replies.messages_as_held`). With a shared store, a session named by id that another
        process holds raises :class:`~sirllm_agents.store.SessionBusyError`; one found by prefix that another
        process holds is not waited for: a new session takes the call."""
        if session_id is not None and not (isinstance(session_id, str) and session_id):
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        named = session_id is not None
        if not named:
            messages = messages_as_held(messages, response_format)
            tools = normalize_tools(tools) if tools else None
        with self._lock:
            if not named:
                session_id = self._longest_prefix(messages, tools)
            session = self._live.get(session_id) if session_id is not None else None
            if session is not None and not self._pins[session_id] and not self.store.holds(session_id):
                # Another process took the session over (our lease lapsed): the copy here is stale.
                self._forget_live(session_id)
                session = None
            if session is None:
                session = self._revive(session_id, config, named)
            self._live[session.session_id] = session
            self._last_used[session.session_id] = time.monotonic()
            self._live.move_to_end(session.session_id)
            if pin:
                self._pins[session.session_id] += 1
            self._shrink()
            return session

    def _longest_prefix(self, messages: list[Mapping[str, Any]], tools: list[dict] | None) -> str | None:
        best, best_len = None, 0
        candidates = [(sid, s.transcript) for sid, s in self._live.items()]
        candidates += [(sid, s.transcript) for sid, s in self._spilled.items()]
        for sid, known in candidates:
            if best_len < len(known.messages) and known.tools == tools and known.holds(messages):
                best, best_len = sid, len(known.messages)
        return best

    def _revive(self, session_id: str | None, config: SessionConfig | None, named: bool) -> Session:
        """Read a spilled session back, or start a new one (also when its file cannot be read: the caller's messages
        hold the whole conversation, so a fresh session still gives the right reply, only slower). Takes the
        session's lease first (see the module docstring)."""
        if session_id is not None:
            try:
                self.store.acquire(session_id)
            except SessionBusyError:
                if named:
                    raise
                self._spilled.pop(session_id, None)  # another process has it now: our routing entry is stale
                session_id = None
        if session_id is None:
            session = Session(self.model, config or self.config)
            self.store.acquire(session.session_id)
            return session
        # A shared store may hold a session another process saved, which this pool has never seen.
        if self._spilled.pop(session_id, None) is not None or self.store.shared:
            try:
                session = self.store.take(self.model, session_id)
            except SessionFileError as error:
                log.warning("session %s could not be read back, starting it afresh: %s", session_id, error)
            else:
                if session is not None:
                    return session
        return Session(self.model, config or self.config, session_id)

    # -- memory bound ---------------------------------------------------------------------------------------------

    def _shrink(self) -> None:
        """Spill least recently used idle sessions until at most ``max_live_sessions`` are live. Sessions in a call
        are skipped, so the bound is exceeded only while more calls than it are in flight."""
        for session_id in list(self._live):
            if len(self._live) <= self.max_live_sessions:
                return
            if not self._pins[session_id]:
                self._spill(self._live[session_id])

    def _spill(self, session: Session) -> bool:
        """Write an idle session to the store, give its lease up and forget it here; True when it went. A session in
        a call (not idle after all) stays."""
        session_id = session.session_id
        if not session.transcript.messages:
            self._forget_live(session_id)  # nothing to keep: a new session is the same
            self.store.release(session_id)
            return True
        try:
            if not self.store.save(session):
                return False
        except SessionBusyError:
            log.warning("session %s was taken over by another process; dropping the stale copy here", session_id)
            self._forget_live(session_id)
            return True
        except (OSError, ValueError) as error:
            log.warning("session %s could not be spilled, keeping it in memory: %s", session_id, error)
            return False
        self.store.release(session_id)
        self._spilled[session_id] = _Spilled(session.transcript)
        self._forget_live(session_id)
        while len(self._spilled) > self.max_spilled_sessions:
            oldest = next(iter(self._spilled))
            log.info("deleting the file of session %s, idle longest of %d spilled", oldest, len(self._spilled))
            try:
                self._drop(oldest)
            except SessionBusyError:  # another process serves it now: its file is that process's to keep
                self._spilled.pop(oldest, None)
        return True

    def _forget_live(self, session_id: str) -> None:
        del self._live[session_id]
        self._last_used.pop(session_id, None)

    def spill_idle(self, idle_seconds: float) -> int:
        """Spill every session that no call has used for ``idle_seconds``, giving its lease up so that another
        process sharing the store can continue it; returns how many went."""
        with self._lock:
            cutoff = time.monotonic() - idle_seconds
            idle = [sid for sid in self._live if not self._pins[sid] and self._last_used.get(sid, 0.0) <= cutoff]
            return sum(self._spill(self._live[sid]) for sid in idle)

    def spill_all(self) -> int:
        """Spill every session not in a call (for a process about to stop, so that others can continue them) and
        give up the leases of any left; returns how many went."""
        count = self.spill_idle(0.0)
        with self._lock:
            for session_id in list(self._live):
                if not self._pins[session_id]:
                    self.store.release(session_id)
        return count

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def add(self, session: Session) -> None:
        """Put ``session`` in the pool under its id, replacing any session of that id (with a shared store, raises
        :class:`~sirllm_agents.store.SessionBusyError` while another process holds that id)."""
        with self._lock:
            self._drop(session.session_id)
            self.store.acquire(session.session_id)
            self._live[session.session_id] = session
            self._last_used[session.session_id] = time.monotonic()
            self._shrink()

    def drop(self, session_id: str) -> bool:
        """Forget a session (and its spilled file); True when there was one. With a shared store, raises
        :class:`~sirllm_agents.store.SessionBusyError` while another process holds it."""
        with self._lock:
            return self._drop(session_id)

    def _drop(self, session_id: str) -> bool:
        self.store.delete(session_id)
        spilled = self._spilled.pop(session_id, None)
        self._last_used.pop(session_id, None)
        return self._live.pop(session_id, None) is not None or spilled is not None

    def live_ids(self) -> list[str]:
        """Ids of the sessions in memory, least recently used first."""
        with self._lock:
            return list(self._live)

    def spilled_ids(self) -> list[str]:
        """Ids of the sessions this pool wrote to its store (and has not read back)."""
        with self._lock:
            return list(self._spilled)
