"""The engine's pool of conversations: which session a call goes to, and which sessions stay in memory.

A call names its session (``session_id``) or is routed to the session whose transcript is the longest prefix of its
messages, a conversation-level prefix cache; with no match a new session starts. At most ``max_live_sessions`` stay
in memory: the least recently used idle one is written to the pool's :class:`~sirllm_agents.store.SessionStore` (a
private folder by default) and read back when its conversation returns, so it continues exactly as if it had stayed.
Past ``max_spilled_sessions`` files, the longest idle one is deleted.

With a shared store (:class:`~sirllm_agents.redis_store.RedisStore`,
:class:`~sirllm_agents.store.SharedDirectoryStore`) several processes serve one set of conversations: a session is
in one process's memory only while that process holds its lease; asking another process for it by id raises
:class:`~sirllm_agents.store.SessionBusyError` until the holder spills it (when idle, on :meth:`SessionPool.spill_idle`
or :meth:`SessionPool.spill_all`) or its lease expires. Every turn is committed to a shared store before it is
answered (:meth:`SessionPool.commit`), so a process that dies loses no acknowledged turn.

Thread safety: the pool's own lock guards only its bookkeeping, never a model call nor a session file's write, read
or deletion (the leases' small files are taken and given up under it). A session being written or read back is
"moving": a call for it waits until it has moved, calls for other sessions go on. A session in a call is pinned and
never spilled; calls on one session are serialized by the session's lock, calls on different sessions run
concurrently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
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
        self._moving: dict[str, threading.Event] = {}  # ids whose file is being written, read or deleted: set when done
        self._saving: dict[str, Session] = {}  # sessions being spilled, still found by prefix routing
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
                if session.session_id in self._live:  # not when a refused commit dropped it
                    self._last_used[session.session_id] = time.monotonic()
                victims = self._victims()
            self._spill_out(victims)

    def commit(self, session: Session) -> None:
        """With a shared store, write ``session`` to it now, so that the turn it just ended outlives this process:
        the engine calls it before the turn's reply is returned. When the write fails (another process took the
        session over: :class:`~sirllm_agents.store.SessionBusyError`; the store unreachable: ``OSError``), the turn
        is not durable, so the copy here is dropped, its lease given up, and the error raised: the next call
        continues from the store's last commit."""
        if not self.store.shared:
            return
        try:
            self.store.commit(session)
        except BaseException:
            with self._lock:
                if self._live.get(session.session_id) is session:
                    self._forget_live(session.session_id)
            with contextlib.suppress(OSError):  # the store is unreachable: the lease lapses on its own
                self.store.release(session.session_id)
            raise

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
        process holds is not waited for: a new session takes the call. The idle sessions this pushes past
        ``max_live_sessions`` are written before it returns, outside the pool's lock."""
        if session_id is not None and not (isinstance(session_id, str) and session_id):
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        named = session_id is not None
        if not named:
            messages = messages_as_held(messages, response_format)
            tools = normalize_tools(tools) if tools else None
        while True:
            with self._lock:
                found = self._longest_prefix(messages, tools) if not named else session_id
                moving = self._moving.get(found) if found is not None else None
                if moving is None:
                    session, reading = self._find(found, config, named)
                    if reading is None:
                        victims = self._settle(session, pin)
                        break
            if moving is not None:
                moving.wait()  # its file is being written or read: route again once it is done
                continue
            session = self._read_back(found, config, reading)
            with self._lock:
                victims = self._settle(session, pin)
                del self._moving[found]
            reading.set()
            break
        self._spill_out(victims)
        return session

    def _find(
        self, session_id: str | None, config: SessionConfig | None, named: bool
    ) -> tuple[Session | None, threading.Event | None]:
        """Under the lock: the live session ``session_id`` names, or a new one, and None; or, when it must be read
        back from the store, None and the event that marks it moving until it is."""
        session = self._live.get(session_id) if session_id is not None else None
        if session is not None and not self._pins[session_id] and not self.store.holds(session_id):
            # Another process took the session over (our lease lapsed): the copy here is stale.
            self._forget_live(session_id)
            session = None
        if session is not None:
            return session, None
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
            return session, None
        # A shared store may hold a session another process saved, which this pool has never seen.
        if self._spilled.pop(session_id, None) is not None or self.store.shared:
            reading = self._moving[session_id] = threading.Event()
            return None, reading
        return Session(self.model, config or self.config, session_id), None

    def _read_back(self, session_id: str, config: SessionConfig | None, reading: threading.Event) -> Session:
        """Outside the lock: the session read back from the store, or a new one under its id when its file is gone or
        cannot be read (the caller's messages hold the whole conversation, so a fresh session still gives the right
        reply, only slower)."""
        try:
            session = self.store.take(self.model, session_id)
        except SessionFileError as error:
            log.warning("session %s could not be read back, starting it afresh: %s", session_id, error)
            session = None
        except BaseException:
            with self._lock:
                del self._moving[session_id]
            reading.set()
            raise
        return session if session is not None else Session(self.model, config or self.config, session_id)

    def _settle(self, session: Session, pin: bool) -> list[Session]:
        """Under the lock: ``session`` live and most recently used (pinned for a call), and the idle sessions that
        must now be spilled."""
        self._live[session.session_id] = session
        self._last_used[session.session_id] = time.monotonic()
        self._live.move_to_end(session.session_id)
        if pin:
            self._pins[session.session_id] += 1
        return self._victims()

    def _longest_prefix(self, messages: list[Mapping[str, Any]], tools: list[dict] | None) -> str | None:
        best, best_len = None, 0
        candidates = [(sid, s.transcript) for sid, s in self._live.items()]
        candidates += [(sid, s.transcript) for sid, s in self._spilled.items()]
        candidates += [(sid, s.transcript) for sid, s in self._saving.items()]
        for sid, known in candidates:
            if best_len < len(known.messages) and known.tools == tools and known.holds(messages):
                best, best_len = sid, len(known.messages)
        return best

    # -- memory bound ---------------------------------------------------------------------------------------------

    def _victims(self) -> list[Session]:
        """Under the lock: the least recently used idle sessions past ``max_live_sessions``, taken out of the live ones
        and marked moving, for :meth:`_spill_out` to write once the lock is released. Sessions in a call are skipped,
        so the bound is exceeded only while more calls than it are in flight."""
        excess = len(self._live) - self.max_live_sessions
        idle = [sid for sid in self._live if not self._pins[sid]][: max(0, excess)]
        return [self._take_out(sid) for sid in idle]

    def _take_out(self, session_id: str) -> Session:
        session = self._saving[session_id] = self._live[session_id]
        self._moving[session_id] = threading.Event()
        self._forget_live(session_id)
        return session

    def _spill_out(self, sessions: list[Session]) -> int:
        """Write each of ``sessions`` (taken out by :meth:`_victims`) to the store without holding the lock, give its
        lease up and record it as spilled; one that cannot be written goes back to the live ones. Then delete the
        files past ``max_spilled_sessions``. Returns how many went."""
        spilled, deletions = 0, []
        for session in sessions:
            outcome = self._write(session)
            with self._lock:
                session_id = session.session_id
                del self._saving[session_id]
                if outcome is None:  # not written: stays in memory, as least recently used
                    self._live[session_id] = session
                    self._live.move_to_end(session_id, last=False)
                    self._last_used[session_id] = time.monotonic()
                else:
                    spilled += 1
                    if outcome != "taken over":
                        self.store.release(session_id)
                    if outcome == "written":
                        self._spilled[session_id] = _Spilled(session.transcript)
                self._moving.pop(session_id).set()
                while len(self._spilled) > self.max_spilled_sessions:
                    oldest = next(iter(self._spilled))
                    log.info("deleting the file of session %s, idle longest of %d spilled", oldest, len(self._spilled))
                    del self._spilled[oldest]
                    self._moving[oldest] = threading.Event()
                    deletions.append(oldest)
        for session_id in deletions:
            try:
                self.store.delete(session_id)
            except SessionBusyError:
                pass  # another process serves it now: its file is that process's to keep
            except OSError as error:
                log.warning("the file of session %s could not be deleted: %s", session_id, error)
            finally:
                with self._lock:
                    self._moving.pop(session_id).set()
        return spilled

    def _write(self, session: Session) -> str | None:
        """Outside the lock: write an idle session to the store. Says how it went: ``"written"``, ``"empty"``
        (nothing to keep: a new session is the same), ``"taken over"`` (another process holds it now: the copy here
        is stale), or None when it could not be written and stays in memory."""
        if not session.transcript.messages:
            return "empty"
        try:
            return "written" if self.store.save(session) else None
        except SessionBusyError:
            log.warning("session %s was taken over by another process; dropping its stale copy", session.session_id)
            return "taken over"
        except Exception as error:  # a spill that fails must never lose the session
            log.warning("session %s could not be spilled, keeping it in memory: %s", session.session_id, error)
            return None

    def _forget_live(self, session_id: str) -> None:
        del self._live[session_id]
        self._last_used.pop(session_id, None)

    def spill_idle(self, idle_seconds: float) -> int:
        """Spill every session that no call has used for ``idle_seconds``, giving its lease up so that another
        process sharing the store can continue it; returns how many went."""
        with self._lock:
            cutoff = time.monotonic() - idle_seconds
            idle = [sid for sid in self._live if not self._pins[sid] and self._last_used.get(sid, 0.0) <= cutoff]
            victims = [self._take_out(sid) for sid in idle]
        return self._spill_out(victims)

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
        session_id = session.session_id
        self._drop(session_id, then=lambda: self._settle(session, pin=False))

    def drop(self, session_id: str) -> bool:
        """Forget a session (and its spilled file); True when there was one. With a shared store, raises
        :class:`~sirllm_agents.store.SessionBusyError` while another process holds it."""
        return self._drop(session_id)

    def _drop(self, session_id: str, then: Callable[[], list[Session]] | None = None) -> bool:
        """Forget ``session_id`` here and delete its file outside the lock (after any move of it has ended); then,
        under the lock, take its lease and run ``then`` (which puts a session under that id)."""
        while True:
            with self._lock:
                moving = self._moving.get(session_id)
                if moving is None:
                    deleting = self._moving[session_id] = threading.Event()
                    spilled = self._spilled.pop(session_id, None)
                    self._last_used.pop(session_id, None)
                    existed = self._live.pop(session_id, None) is not None or spilled is not None
                    break
            moving.wait()
        victims: list[Session] = []
        try:
            self.store.delete(session_id)
            if then is not None:
                with self._lock:
                    self.store.acquire(session_id)
                    victims = then()
        finally:
            with self._lock:
                del self._moving[session_id]
            deleting.set()
        self._spill_out(victims)
        return existed

    def live_ids(self) -> list[str]:
        """Ids of the sessions in memory, least recently used first."""
        with self._lock:
            return list(self._live)

    def spilled_ids(self) -> list[str]:
        """Ids of the sessions this pool wrote to its store (and has not read back)."""
        with self._lock:
            return list(self._spilled)
