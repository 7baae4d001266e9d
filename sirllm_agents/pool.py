"""The engine's pool of conversations: which session a call goes to, and which sessions stay in memory.

A call names its session (``session_id``) or is routed to the session whose transcript is the longest prefix of its
messages, a conversation-level prefix cache; with no match a new session starts. At most ``max_live_sessions`` stay
in memory: the least recently used idle one is written to ``spill_dir`` and read back when its conversation returns,
so it continues exactly as if it had stayed. Past ``max_spilled_sessions`` files, the longest idle one is deleted.

Thread safety: the pool's own lock guards only its bookkeeping, never a model call. A session in a call is pinned
and never spilled; calls on one session are serialized by the session's lock, calls on different sessions run
concurrently.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import SessionConfig
from .persistence import SessionFileError
from .replies import messages_as_held
from .session import Session
from .tools import normalize_tools
from .transcript import Message, normalize_messages, starts_with

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger(__name__)


@dataclass
class _Spilled:
    """A session written to disk, with what routing needs to find it again."""

    path: Path
    messages: list[Message]
    tools: list[dict] | None


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
    ):
        if not isinstance(max_live_sessions, int) or max_live_sessions < 1:
            raise ValueError(f"max_live_sessions must be a positive integer, got {max_live_sessions!r}")
        if not isinstance(max_spilled_sessions, int) or max_spilled_sessions < 0:
            raise ValueError(f"max_spilled_sessions must be a non-negative integer, got {max_spilled_sessions!r}")
        self.model = model
        self.max_live_sessions = max_live_sessions
        self.max_spilled_sessions = max_spilled_sessions
        self.config = config.sized(model.max_length)  # checked against the model now rather than at the first call
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._live: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._spilled: dict[str, _Spilled] = {}  # longest idle first
        self._pins: Counter[str] = Counter()
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
        :func:`~sirllm_agents.replies.messages_as_held`)."""
        if session_id is not None and not (isinstance(session_id, str) and session_id):
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        if session_id is None:
            messages = messages_as_held(normalize_messages(messages), response_format)
            tools = normalize_tools(tools) if tools else None
        with self._lock:
            if session_id is None:
                session_id = self._longest_prefix(messages, tools)
            session = self._live.get(session_id) if session_id is not None else None
            if session is None:
                session = self._revive(session_id, config)
            self._live[session.session_id] = session
            self._live.move_to_end(session.session_id)
            if pin:
                self._pins[session.session_id] += 1
            self._shrink()
            return session

    def _longest_prefix(self, messages: list[Message], tools: list[dict] | None) -> str | None:
        best, best_len = None, 0
        candidates = [(sid, s.transcript.messages, s.transcript.tools) for sid, s in self._live.items()]
        candidates += [(sid, s.messages, s.tools) for sid, s in self._spilled.items()]
        for sid, known, known_tools in candidates:
            if best_len < len(known) and known_tools == tools and starts_with(messages, known):
                best, best_len = sid, len(known)
        return best

    def _revive(self, session_id: str | None, config: SessionConfig | None) -> Session:
        """Read a spilled session back, or start a new one (also when its file cannot be read: the caller's messages
        hold the whole conversation, so a fresh session still gives the right reply, only slower)."""
        spilled = self._spilled.pop(session_id, None) if session_id is not None else None
        if spilled is not None:
            try:
                session = Session.load(self.model, spilled.path, session_id)
            except SessionFileError as error:
                log.warning("session %s could not be read back, starting it afresh: %s", session_id, error)
            else:
                spilled.path.unlink(missing_ok=True)
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

    def _spill(self, session: Session) -> None:
        """Write an idle session to disk and forget it here; a session in a call (not idle after all) stays."""
        if not session.transcript.messages:
            del self._live[session.session_id]  # nothing to keep: a new session is the same
            return
        path = self._folder() / (hashlib.sha256(session.session_id.encode()).hexdigest()[:32] + ".safetensors")
        try:
            if not session.save(path, wait=False):
                return
        except (OSError, ValueError) as error:
            log.warning(
                "session %s could not be spilled to %s, keeping it in memory: %s", session.session_id, path, error
            )
            return
        transcript = session.transcript
        self._spilled[session.session_id] = _Spilled(path, transcript.messages, transcript.tools)
        del self._live[session.session_id]
        while len(self._spilled) > self.max_spilled_sessions:
            oldest = next(iter(self._spilled))
            log.info("deleting the file of session %s, idle longest of %d spilled", oldest, len(self._spilled))
            self._drop(oldest)

    def _folder(self) -> Path:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="sirllm-agents-spill-"))
            # A folder the pool made itself goes with it; a folder the caller named is left alone.
            weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        return self._spill_dir

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def add(self, session: Session) -> None:
        """Put ``session`` in the pool under its id, replacing any session of that id."""
        with self._lock:
            self._drop(session.session_id)
            self._live[session.session_id] = session
            self._shrink()

    def drop(self, session_id: str) -> bool:
        """Forget a session (and its spilled file); True when there was one."""
        with self._lock:
            return self._drop(session_id)

    def _drop(self, session_id: str) -> bool:
        spilled = self._spilled.pop(session_id, None)
        if spilled is not None:
            spilled.path.unlink(missing_ok=True)
        return self._live.pop(session_id, None) is not None or spilled is not None

    def live_ids(self) -> list[str]:
        """Ids of the sessions in memory, least recently used first."""
        with self._lock:
            return list(self._live)

    def spilled_ids(self) -> list[str]:
        """Ids of the sessions written to disk."""
        with self._lock:
            return list(self._spilled)
