"""A Session: one conversation whose KV cache lives across calls, and the request path into it.

Each call gets the whole conversation, prefills only what the session has not ingested yet, decodes a reply into
the same bounded cache, and closes the turn so the cache holds exactly the chat-template rendering of the
conversation (minus what was evicted). The parts are plain: the conversation (transcript and cache state,
:mod:`~sirllm_agents.conversation`), the functions that feed the cache (:mod:`~sirllm_agents.cache_state`), and here
the request being run, with the lock, the figures and the files.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from . import scoring
from .async_stream import AsyncReplyStream
from .cache import SirLLMCache
from .cache_state import decode_step, probe
from .config import SessionConfig
from .conversation import Conversation
from .generation import Decoding, GenerationConfig, TokenConstraint
from .memory import Memory, session_memory
from .persistence import read_session, write_session
from .replies import Event, Reply, ReplyStream, Request, ShownText, TextDelta, finish_reply, plan_request
from .stats import SessionStats, TurnStats
from .transcript import Transcript

if TYPE_CHECKING:
    from .model import Model
    from .policies import Policy


class Session:
    """One conversation on a :class:`~sirllm_agents.model.Model`, created by ``engine.session(...)``.

    Calls on one session are serialized by a lock; a stream holds it from its first event until it ends or is
    closed.
    """

    def __init__(self, model: Model, config: SessionConfig | None = None, session_id: str | None = None):
        self.model = model
        self.config = (config or SessionConfig()).sized(model.max_length)
        self.session_id = session_id or uuid.uuid4().hex
        self.conversation = Conversation(model, self.config)
        self.stats = SessionStats()
        # The figures of each call, in order (the newest ``config.turn_log_calls``): the memory view charts them.
        self.turn_log: deque[TurnStats] = deque(maxlen=self.config.turn_log_calls)
        self._lock = threading.Lock()
        self._owner: int | None = None

    @property
    def cache_size(self) -> int:
        return self.config.cache_size

    @property
    def cache(self) -> SirLLMCache:
        """The bounded cache: the runner and what is recorded of each cached token."""
        return self.conversation.cache

    @property
    def transcript(self) -> Transcript:
        """The messages ingested, as the session holds them."""
        return self.conversation.transcript

    @property
    def policy(self) -> Policy:
        """The eviction policy the cache ranks tokens by (made from ``config``)."""
        return self.cache.policy

    @property
    def progress(self) -> Callable[[int, int], None] | None:
        """Called as ``progress(done, total)`` after each prefill chunk of a long message being ingested."""
        return self.conversation.progress

    @progress.setter
    def progress(self, report: Callable[[int, int], None] | None) -> None:
        self.conversation.progress = report

    # -- the request ---------------------------------------------------------------------------------------------

    def chat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> Reply:
        """Reply to ``messages``, the whole conversation so far (OpenAI-style dicts). Takes the keywords of
        :meth:`stream`."""
        return self.stream(messages, **options).finish()

    def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        response_format: Mapping[str, Any] | None = None,
        constraint: TokenConstraint | None = None,
        generation: GenerationConfig | None = None,
        **decoding: Any,
    ) -> ReplyStream:
        """Reply to ``messages`` event by event: :class:`~sirllm_agents.replies.TextDelta` as the content is decoded
        (never a broken UTF-8 character, never part of a stop string, never tool-call markup), then one
        :class:`~sirllm_agents.replies.ToolCallDelta` per call. The finished :class:`Reply` is ``stream.reply``.
        Greedy unless ``temperature``.

        ``tools`` (OpenAI tool definitions) are rendered by the chat template, or described in the system message
        when it ignores them. ``tool_choice``: ``"auto"`` (default), ``"none"`` (no call is read), ``"required"``
        or a tool's name (exactly one call, grammar-constrained). ``response_format``: ``{"type": "json_schema",
        ...}`` or ``{"type": "json_object"}`` (grammar-constrained JSON). ``constraint`` is a custom
        :class:`~sirllm_agents.generation.TokenConstraint`.

        How to decode: ``generation`` (a :class:`~sirllm_agents.generation.GenerationConfig`, default: its
        defaults) with any of its fields given as keywords over it (``max_new_tokens``, ``temperature``, ``top_p``,
        ``top_k``, ``seed``, ``stop``, the repetition penalties); a keyword left at ``None`` keeps the default.
        Repetition penalties (``frequency_penalty``, ``presence_penalty``, ``repeat_penalty`` over
        ``repeat_last_n`` tokens, DRY's ``dry_*``; see :mod:`sirllm_agents.penalties`): off for free text unless
        given; a grammar-constrained reply uses :data:`~sirllm_agents.penalties.CONSTRAINED_PENALTIES` for those not
        given.

        A stream abandoned midway (closed, garbage-collected, or broken by an exception) rolls the partial reply
        back: the session then holds the conversation up to and including ``messages``, as if no reply had been
        asked for, so the next call may either resend ``messages`` with a new message or retry them as they were.
        """
        config = GenerationConfig.of(generation, **decoding)
        request = plan_request(self.model, messages, tools, tool_choice, response_format)
        if constraint is not None:
            if request.constraint is not None:
                raise ValueError("pass constraint= or a required tool_choice / response_format, not both")
            request.constraint = constraint
        return ReplyStream(self._turn(request, config), self)

    async def achat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> Reply:
        """:meth:`chat` for an event loop, which keeps serving other work meanwhile (see :meth:`astream`)."""
        return await self.astream(messages, **options).finish()

    def astream(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> AsyncReplyStream:
        """:meth:`stream` for an event loop: the reply is decoded in a thread of its own and its events handed over
        as they come. Leaving the iteration early (``aclose``) stops decoding and rolls the partial reply back."""
        return AsyncReplyStream(lambda: self.stream(messages, **options))

    def score(
        self, messages: Sequence[Mapping[str, Any]], options: Sequence[str], *, tools: list[dict] | None = None
    ) -> list[float]:
        """The log-likelihood of each option as the assistant's reply to ``messages`` (the whole conversation so far):
        the sum of ``log p(token | everything before)`` over the tokens of the option's text as the chat template
        renders it in an assistant message (without the end-of-turn marker).

        ``messages`` and the generation prompt are prefilled once, like a :meth:`chat` turn; each option is then run
        from that shared prefix and cut off again, after the cache made room for the longest one, so no option
        evicts anything another option sees. Afterwards the session holds ``messages`` and no reply (as after an
        abandoned stream): the next call that adds the chosen option as an assistant message prefills just that.
        Options never stay in the cache. Like a turn, the call multiplies the stored scores by ``decay`` once.
        """
        if isinstance(options, str) or not options or any(not isinstance(o, str) or not o for o in options):
            raise ValueError("options must be a non-empty list of non-empty strings")
        request = plan_request(self.model, messages, tools, None, None)
        with self._locked():
            turn = TurnStats()
            with self.model.scheduler.request(), self._rolling_back(turn):
                asked, _ = self.conversation.ask(request, turn, reserve=0)
                start = time.perf_counter()
                option_ids = scoring.reply_ids(self.model, asked, options)
                turn.evicted_tokens += scoring.make_room_for(self.cache, option_ids)
                scores = [-probe(self.conversation.state, ids) for ids in option_ids]
                turn.decode_seconds += time.perf_counter() - start
                self.conversation.rollback(asked)
                self.cache.decay(self.config.decay)
            self._record(turn)
            return scores

    def ingest(self, messages: Sequence[Mapping[str, Any]], *, tools: list[dict] | None = None) -> TurnStats:
        """Prefill ``messages`` (the whole conversation so far) without asking for a reply: context that needs no
        answer, such as a scripted exchange or a document, added as a turn. Only what the session has not ingested
        yet is prefilled (a conversation that does not extend it restarts, as in :meth:`chat`); afterwards the
        session holds ``messages`` and the next call prefills only what follows them. Like a turn, the call
        multiplies the stored scores by ``decay`` once. Returns the call's figures."""
        request = plan_request(self.model, messages, tools, None, None)
        with self._locked():
            turn = TurnStats()
            with self.model.scheduler.request(), self._rolling_back(turn):
                self.conversation.extend(request, turn, reserve=0)
            turn.input_tokens = self.conversation.state.position
            self.cache.decay(self.config.decay)
            self._record(turn, completed=True)
            return turn

    # -- the session as a whole ----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation: empty cache and transcript (totals in ``stats`` are kept)."""
        with self._locked():
            self.conversation.reset()

    def fork(self, session_id: str | None = None) -> Session:
        """An independent copy of this session (cache, transcript, settings and stats), e.g. to try several
        continuations of one conversation; calls on either never change the other. Waits for a call in progress to
        end."""
        with self._locked():
            twin = Session(self.model, self.config, session_id)
            twin.conversation = self.conversation.copy()
            twin.stats = dataclasses.replace(self.stats)
            twin.turn_log.extend(dataclasses.replace(turn) for turn in self.turn_log)
            return twin

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The whole session as JSON data and named tensors (what a session file holds, see
        :mod:`sirllm_agents.persistence`). Waits for a call in progress to end."""
        with self._locked():
            return self._state()

    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        transcript = self.transcript
        document = {
            "session_id": self.session_id,
            "settings": self.config.to_json(),
            "transcript": {
                "messages": transcript.messages,
                "tools": transcript.tools,
                "length": transcript.length,
                "spans": transcript.spans,
            },
            "cache": {"position": self.conversation.state.position, "turn": self.conversation.state.turn},
            "stats": dataclasses.asdict(self.stats),
            "turn_log": [dataclasses.asdict(turn) for turn in self.turn_log],
        }
        tensors = self.cache.records() | {f"runner.{k}": v for k, v in self.cache.runner.state().items()}
        return document, {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}

    @classmethod
    def from_state(
        cls, model: Model, document: dict[str, Any], tensors: dict[str, torch.Tensor], session_id: str | None = None
    ) -> Session:
        """A session on ``model`` holding what :meth:`state` exported (``session_id`` replaces the saved id)."""
        session = cls(model, SessionConfig(**document["settings"]), session_id or document["session_id"])
        runner = {name.removeprefix("runner."): t for name, t in tensors.items() if name.startswith("runner.")}
        session.cache.runner.load_state(runner)
        session.cache.load_records(tensors)
        state = session.conversation.state
        state.position, state.turn = document["cache"]["position"], document["cache"]["turn"]
        t = document["transcript"]
        spans = [tuple(s) for s in t["spans"]]
        # A loaded session has not seen the caller's form of its messages: the next call checks each of them once.
        raw = [None] * len(t["messages"])
        session.conversation.transcript = Transcript(t["messages"], t["tools"], t["length"], spans, model.template, raw)
        session.stats = SessionStats(**document["stats"])
        session.turn_log.extend(TurnStats(**turn) for turn in document["turn_log"])
        return session

    def save(self, path: str | os.PathLike, *, wait: bool = True) -> bool:
        """Write the session (KV cache, scores, transcript, settings, stats) to ``path``, atomically: a crash midway
        leaves any earlier file there intact. ``engine.load_session(path)`` resumes it, in this or another process,
        with the same greedy replies. Never pickled (see :mod:`sirllm_agents.persistence`). Waits for a call in
        progress to end, or with ``wait=False`` writes nothing and returns False while one runs."""
        if not wait:
            if not self._lock.acquire(blocking=False):
                return False
            try:
                write_session(path, self.model, *self._state())
            finally:
                self._lock.release()
            return True
        with self._locked():
            write_session(path, self.model, *self._state())
        return True

    @classmethod
    def load(cls, model: Model, path: str | os.PathLike, session_id: str | None = None) -> Session:
        """The session saved at ``path`` (by :meth:`save`), on ``model``; raises ``SessionFileError`` (a
        ``ValueError``) for a missing, truncated or corrupted file or one saved from another model or dtype."""
        return cls.from_state(model, *read_session(path, model), session_id)

    def memory(self) -> Memory:
        """What the cache holds now: the retained tokens in cache order (text, decayed score, turn), every ingested
        token of the conversation with whether it was evicted, and per-turn counts (see :class:`Memory`)."""
        with self._locked():
            return session_memory(self)

    def __len__(self) -> int:
        return len(self.cache)

    # -- one call ------------------------------------------------------------------------------------------------

    def _turn(self, request: Request, config: GenerationConfig) -> Generator[Event, None, Reply]:
        with self._locked():
            turn = TurnStats()
            shown = ShownText(request.stream_mode)
            with self.model.scheduler.request() as ticket, self._rolling_back(turn):
                # Reserve room for a reply of up to a quarter of the cache before the turn is cached; a longer reply
                # evicts while decoding.
                reserve = min(config.max_new_tokens, self.cache_size // 4)
                asked, prompt_ids = self.conversation.ask(request, turn, reserve)
                start = time.perf_counter()
                decoding = Decoding(self.model, self.cache.logits, self._decode_step(turn), config, request.constraint)
                for piece in decoding:
                    if text := shown.push(piece):
                        with ticket.away():
                            yield TextDelta(text)
                turn.decode_seconds += time.perf_counter() - start
                text, finish_reason, token_ids = decoding.text, decoding.finish_reason, decoding.token_ids
                turn.generated_tokens = len(token_ids)
                reply = finish_reply(request, text, finish_reason, token_ids, turn)
                reply.session_id = self.session_id
                self.conversation.close(asked, prompt_ids, reply, turn)
                self.cache.decay(self.config.decay)
            self._record(turn, completed=True)
            yield from shown.rest(reply)
            return reply

    def _decode_step(self, turn: TurnStats) -> Callable[[int], torch.Tensor]:
        """How decoding feeds each sampled token into the cache, counting what it evicts; evicting makes room for a
        few more tokens at once rather than paying for an eviction on every one."""
        slack = max(1, min(64, self.cache_size // 16))

        def step(token: int) -> torch.Tensor:
            logits, evicted = decode_step(self.conversation.state, token, slack)
            turn.evicted_tokens += evicted
            return logits

        return step

    @contextmanager
    def _rolling_back(self, turn: TurnStats) -> Iterator[None]:
        """On any failure (an exception, an interrupt, an abandoned stream), cut the cache back to the transcript,
        the last state that matched it, and record the turn's figures so far."""
        try:
            yield
        except BaseException:
            self.conversation.rollback(self.transcript)
            self._record(turn)
            raise

    def _record(self, turn: TurnStats, completed: bool = False) -> None:
        turn.cache_len = len(self.cache)
        self.stats.add(turn)
        self.stats.turns += completed
        self.conversation.state.turn += completed
        self.turn_log.append(turn)

    def _locked(self):
        """The session lock; a call from the thread that holds it (an open stream) is an error, not a deadlock."""
        if self._owner == threading.get_ident():
            raise RuntimeError("a stream on this session is still open in this thread: finish or close it first")
        return _Owned(self)


class _Owned:
    def __init__(self, session: Session):
        self.session = session

    def __enter__(self) -> None:
        self.session._lock.acquire()
        self.session._owner = threading.get_ident()

    def __exit__(self, *exc) -> None:
        self.session._owner = None
        self.session._lock.release()
