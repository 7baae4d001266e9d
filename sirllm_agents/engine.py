"""The Engine: one loaded model and the pool of conversations on it: the top of the library's layers."""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from .async_stream import AsyncReplyStream
from .config import SessionConfig
from .model import Model
from .pool import SessionPool
from .replies import Event, Reply, ReplyStream
from .scheduler import DEFAULT_PARALLEL
from .session import Session
from .store import SessionStore

DEFAULT_MAX_LIVE_SESSIONS = 16
DEFAULT_MAX_SPILLED_SESSIONS = 1024

_shared: weakref.WeakValueDictionary[tuple, Engine] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


class Engine:
    """A local causal LM ready to serve stateful chat sessions.

    ``Engine()`` loads the embedded SmolLM2-135M-Instruct (offline); ``Engine(model=...)`` takes a local folder, a hub
    id, a ``.gguf`` file, an already loaded ``PreTrainedModel`` together with ``tokenizer=``, or a
    :class:`~sirllm_agents.model.Model`. ``backend`` picks what runs it: ``"torch"``, ``"llamacpp"`` (GGUF files, CPU)
    or ``"auto"``, llama.cpp for a GGUF when it is installed (see :meth:`Model.load`, which takes the other loading
    arguments). Up to ``parallel`` calls, on any sessions, run at once (with ``batch``, their forwards batched
    together by the model's scheduler); more wait their turn.

    The engine also holds a pool of conversations for :meth:`chat` / :meth:`stream` / :meth:`achat`: each call goes
    to the session named by ``session_id``, else to the one whose transcript is the longest prefix of its messages.
    At most ``max_live_sessions`` stay in memory; the least recently used idle one is saved to ``spill_dir`` (a
    private temporary folder by default) and read back when its conversation returns. At most
    ``max_spilled_sessions`` files are kept: past that the longest-idle one is deleted, and if its conversation
    returns it starts afresh from the messages sent (the right reply, after a full re-prefill). Pooled sessions are
    made with ``config`` (a :class:`SessionConfig`). ``store`` replaces ``spill_dir`` with any
    :class:`~sirllm_agents.store.SessionStore`, e.g. a ``RedisStore`` or ``SharedDirectoryStore`` shared by several
    server processes (``open_store(url or folder)``); with a shared store every turn is committed to it before the
    call returns its reply.
    """

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel | Model | None = None,
        *,
        backend: str = "auto",
        tokenizer=None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        threads: int | None = None,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
        parallel: int = DEFAULT_PARALLEL,
        batch: bool | None = None,
        max_live_sessions: int = DEFAULT_MAX_LIVE_SESSIONS,
        max_spilled_sessions: int = DEFAULT_MAX_SPILLED_SESSIONS,
        spill_dir: str | os.PathLike | None = None,
        config: SessionConfig | None = None,
        store: SessionStore | None = None,
    ):
        if isinstance(model, Model):
            self.model = model
        else:
            self.model = Model.load(
                model,
                backend=backend,
                tokenizer=tokenizer,
                device=device,
                dtype=dtype,
                threads=threads,
                trust_remote_code=trust_remote_code,
                chat_template=chat_template,
                parallel=parallel,
                batch=batch,
            )
        self.pool = SessionPool(
            self.model,
            max_live_sessions=max_live_sessions,
            max_spilled_sessions=max_spilled_sessions,
            spill_dir=spill_dir,
            config=config or SessionConfig(),
            store=store,
        )

    @classmethod
    def shared(cls, model: str | None = None, **loading: Any) -> Engine:
        """The process-wide engine for ``model`` (``None``: the embedded model) loaded with the keyword arguments
        ``loading`` of :class:`Engine` (``backend``, ``device``, ``dtype``, ``threads``, ...; one left at ``None``
        or at its default is not given): loaded once and shared by every adapter that asks for the same, freed once
        nothing holds it."""
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
        given = {name: value for name, value in loading.items() if value is not None and value != defaults.get(name)}
        key = (model, *sorted((name, str(value)) for name, value in given.items()))
        with _shared_lock:
            engine = _shared.get(key)
            if engine is None:
                engine = _shared[key] = cls(model, **given)
            return engine

    def session(self, config: SessionConfig | None = None, session_id: str | None = None, **settings: Any) -> Session:
        """A new conversation outside the engine's pool (see :meth:`chat` for pooled conversations), with a cache
        bounded as ``config`` says, or as the :class:`SessionConfig` fields in ``settings`` say."""
        return Session(self.model, SessionConfig.of(config, **settings), session_id)

    # -- the pool of conversations -------------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        session_id: str | None = None,
        *,
        config: SessionConfig | None = None,
        **options: Any,
    ) -> Reply:
        """Reply to ``messages`` (the whole conversation so far) on the pooled session for them: the one named
        ``session_id`` (created when new), else the one whose transcript is the longest prefix of ``messages``, else
        a new one. A session made by the call takes ``config`` (default: the engine's); one that exists keeps its
        own. ``options`` takes ``one_off`` (see :meth:`stream`) and the keywords of :meth:`Session.stream`.
        Thread-safe; calls on one session are serialized, calls on different sessions run concurrently (their
        forwards batched, see :mod:`sirllm_agents.scheduler`)."""
        return self.stream(messages, session_id, config=config, **options).finish()

    def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        session_id: str | None = None,
        *,
        config: SessionConfig | None = None,
        one_off: bool = False,
        **options: Any,
    ) -> ReplyStream:
        """Like :meth:`chat`, event by event (see :meth:`Session.stream`). The session is chosen when the first
        event is asked for (``stream.session`` from then on) and stays pinned in memory until the stream ends or is
        closed.

        ``one_off=True`` runs the call on a copy of that session (``Session.fork``), dropped afterwards: a side call
        (a structured extraction, a title, a completion) reuses what the conversation's session already holds and
        leaves it as it was; a one-off call that no session matches leaves no session behind."""

        def events() -> Generator[Event, None, Reply]:
            tools, response_format = options.get("tools"), options.get("response_format")
            with self.pool.use(messages, tools, session_id, config, response_format) as session:
                if not one_off:
                    stream.session = session
                    reply = yield from session.stream(messages, **options)
                    self.pool.commit(session)  # with a shared store the turn is durable before it is answered
                    return reply
                made_here = session_id is None and not session.transcript.messages  # no session held a prefix
                stream.session = session.fork()
            if made_here:
                self.pool.drop(session.session_id)
            return (yield from stream.session.stream(messages, **options))

        stream = ReplyStream(events())
        return stream

    async def achat(
        self,
        messages: Sequence[Mapping[str, Any]],
        session_id: str | None = None,
        *,
        config: SessionConfig | None = None,
        **options: Any,
    ) -> Reply:
        """:meth:`chat` for an event loop: decoded in a worker thread, so the loop keeps serving other conversations
        meanwhile."""
        return await self.astream(messages, session_id, config=config, **options).finish()

    def astream(
        self,
        messages: Sequence[Mapping[str, Any]],
        session_id: str | None = None,
        *,
        config: SessionConfig | None = None,
        **options: Any,
    ) -> AsyncReplyStream:
        """:meth:`stream` for an event loop (see :meth:`Session.astream`)."""
        return AsyncReplyStream(lambda: self.stream(messages, session_id, config=config, **options))

    def route(
        self,
        messages: Sequence[Mapping[str, Any]],
        session_id: str | None = None,
        *,
        tools: list[dict] | None = None,
        config: SessionConfig | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> Session:
        """The pooled session a call with these arguments would use (created or read back when needed), for
        inspection. Call through :meth:`chat` / :meth:`stream`: a session used directly may be spilled to disk once
        idle, and the pool would not see what it did afterwards."""
        return self.pool.route(messages, tools, session_id, config, response_format)

    def load_session(self, path: str | os.PathLike, session_id: str | None = None) -> Session:
        """Resume a session saved with :meth:`Session.save` (by this or another process) and add it to the pool
        under ``session_id`` (default: the id it was saved with), replacing any session of that id. Raises
        ``SessionFileError`` (a ``ValueError``), changing nothing, for a missing, truncated or corrupted file or one
        saved from another model or dtype."""
        session = Session.load(self.model, path, session_id)
        self.pool.add(session)
        return session

    def drop_session(self, session_id: str) -> bool:
        """Forget a pooled session (in memory or spilled); True when there was one."""
        return self.pool.drop(session_id)
