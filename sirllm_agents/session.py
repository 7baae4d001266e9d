"""A Session: one conversation whose KV cache lives across calls.

Each call gets the whole conversation, prefills only what the session has not ingested yet, decodes a reply into
the same bounded cache, and closes the turn so the cache holds exactly the chat-template rendering of the
conversation (minus what was evicted).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from . import scoring
from .cache import SirLLMCache
from .config import SessionConfig
from .generation import Decoding, GenerationConfig, TokenConstraint
from .memory import Memory, session_memory
from .persistence import read_session, write_session
from .replies import Event, Reply, ReplyStream, Request, ShownText, TextDelta, finish_reply, plan_request
from .transcript import Message, Segment, Transcript

if TYPE_CHECKING:
    from .model import Model

Marked = tuple[list[int], list[bool]]  # token ids, and per token whether the chat template wrote it


@dataclass
class TurnStats:
    """Figures of one call. ``input_tokens = reused_tokens + prefilled_tokens`` (on a restart nothing is reused)."""

    input_tokens: int = 0  # tokens of the whole rendered prompt
    reused_tokens: int = 0  # of those, already ingested by earlier calls: not prefilled again
    prefilled_tokens: int = 0  # prompt tokens run through the model this call
    generated_tokens: int = 0
    evicted_tokens: int = 0
    cache_len: int = 0  # tokens in the cache after the call
    restarts: int = 0  # 1 when the conversation did not extend the session's transcript
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass
class SessionStats(TurnStats):
    """Totals over a session's calls; ``cache_len`` is the current length, ``turns`` the completed replies."""

    turns: int = 0

    def add(self, turn: TurnStats) -> None:
        for f in fields(TurnStats):
            if f.name != "cache_len":
                setattr(self, f.name, getattr(self, f.name) + getattr(turn, f.name))
        self.cache_len = turn.cache_len


class Session:
    """One conversation on a :class:`~sirllm_agents.model.Model`, created by ``engine.session(...)``.

    Calls on one session are serialized by a lock; a stream holds it from its first event until it ends or is
    closed.
    """

    def __init__(self, model: Model, config: SessionConfig | None = None, session_id: str | None = None):
        self.model = model
        self.config = (config or SessionConfig()).sized(model.max_length)
        self.session_id = session_id or uuid.uuid4().hex
        self.policy = self.config.make_policy()
        self.cache = self._new_cache()
        self.transcript = Transcript(template=model.template)
        self.stats = SessionStats()
        # The figures of each call, in order (the newest ``config.turn_log_calls``): the memory view charts them.
        self.turn_log: deque[TurnStats] = deque(maxlen=self.config.turn_log_calls)
        # Called as progress(done, total) after each prefill chunk of a segment (a long message being ingested).
        self.progress: Callable[[int, int], None] | None = None
        self._position = 0  # tokens ingested over the whole conversation
        self._lock = threading.Lock()
        self._owner: int | None = None

    @property
    def cache_size(self) -> int:
        return self.config.cache_size

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
        """:meth:`chat` in a worker thread, so an event loop keeps serving other work meanwhile."""
        return await asyncio.to_thread(self.chat, messages, **options)

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
                asked, _ = self._ask(request, turn, reserve=0)
                start = time.perf_counter()
                option_ids = scoring.reply_ids(self.model, asked, options)
                turn.evicted_tokens += scoring.make_room_for(self.cache, option_ids)
                scores = [scoring.logprob(self.cache, ids, self._position) for ids in option_ids]
                turn.decode_seconds += time.perf_counter() - start
                self._rollback(asked)
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
                self._extend(request, turn, reserve=0)
            turn.input_tokens = self._position
            self.cache.decay(self.config.decay)
            self._record(turn, completed=True)
            return turn

    # -- the session as a whole ----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation: empty cache and transcript (totals in ``stats`` are kept)."""
        with self._locked():
            self._reset()

    def fork(self, session_id: str | None = None) -> Session:
        """An independent copy of this session (cache, transcript, settings and stats), e.g. to try several
        continuations of one conversation; calls on either never change the other. Waits for a call in progress to
        end."""
        with self._locked():
            twin = Session(self.model, self.config, session_id)
            twin.cache = self.cache.copy()
            twin.transcript = dataclasses.replace(self.transcript, raw=list(self.transcript.raw))
            twin.stats = dataclasses.replace(self.stats)
            twin.turn_log.extend(dataclasses.replace(turn) for turn in self.turn_log)
            twin._position = self._position
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
            "position": self._position,
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
        session._position = document["position"]
        t = document["transcript"]
        spans = [tuple(s) for s in t["spans"]]
        # A loaded session has not seen the caller's form of its messages: the next call checks each of them once.
        raw = [None] * len(t["messages"])
        session.transcript = Transcript(t["messages"], t["tools"], t["length"], spans, model.template, raw)
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
                asked, prompt_ids = self._ask(request, turn, reserve)
                start = time.perf_counter()
                decoding = Decoding(
                    self.model, self.cache.logits, self._ingest_generated(turn), config, request.constraint
                )
                for piece in decoding:
                    if text := shown.push(piece):
                        with ticket.away():
                            yield TextDelta(text)
                turn.decode_seconds += time.perf_counter() - start
                text, finish_reason, token_ids = decoding.text, decoding.finish_reason, decoding.token_ids
                turn.generated_tokens = len(token_ids)
                reply = finish_reply(request, text, finish_reason, token_ids, turn)
                reply.session_id = self.session_id
                self._close_turn(asked, prompt_ids, reply, turn)
                self.cache.decay(self.config.decay)
            self._record(turn, completed=True)
            yield from shown.rest(reply)
            return reply

    def _ingest_generated(self, turn: TurnStats) -> Callable[[int], torch.Tensor]:
        """How decoding feeds each sampled token: into the cache (evicting a few slots at once when it must, rather
        than paying for an eviction on every token); returns the logits that score the next one."""
        slack = max(1, min(64, self.cache_size // 16))

        def ingest(token: int) -> torch.Tensor:
            turn.evicted_tokens += self.cache.make_room(1, slack)
            self._feed([token], [False])
            return self.cache.logits

        return ingest

    def _ask(self, request: Request, turn: TurnStats, reserve: int) -> tuple[Transcript, list[int]]:
        """Ingest the request's messages and the generation prompt, restarting when they do not extend the
        transcript, and leave the logits that score the reply's first token; ``reserve`` more slots are freed for
        what follows when the turn fits the cache. Returns the transcript of the messages (the state to roll back to)
        and the prompt's token ids."""
        prompt_ids, prompt_marks = self._extend(request, turn, reserve)
        start = time.perf_counter()
        turn.prefilled_tokens += self._prefill(prompt_ids, turn, prompt_marks)
        self._score_first_token()
        turn.prefill_seconds += time.perf_counter() - start
        turn.input_tokens = self._position
        return self.transcript, prompt_ids

    def _extend(self, request: Request, turn: TurnStats, reserve: int) -> Marked:
        """Ingest the messages the transcript lacks (all of them after a restart) and return the token ids of the
        generation prompt that would follow them, with their template marks (see ``Model.encode_marked``)."""
        messages, raw = self.transcript.recognise(request.messages)
        template = self.model.template
        segments = self.transcript.plan(messages, template, request.tools)
        if segments is None:
            self._reset()
            turn.restarts = 1
            segments = self.transcript.plan(messages, template, request.tools)
            if segments is None:
                raise ValueError(
                    "the chat template's generation prompt does not extend its own rendering of these messages, "
                    "so the conversation cannot be followed incrementally"
                )
        turn.reused_tokens = self.transcript.length
        encoded = [
            self.model.encode_marked(segment.text, [messages[i]["content"] for i in segment.messages])
            for segment in segments
        ]
        # +1: after a rollback the newest cached token is fed again.
        new_tokens = sum(len(ids) for ids, _ in encoded) + 1
        if new_tokens + reserve <= self.cache.max_chunk:
            # Make room for the whole turn before any of it is cached, as StreamingLLM and SirLLM do: the turn's
            # own tokens (low-entropy template tokens included) then never compete for a place while it is running.
            turn.evicted_tokens += self.cache.make_room(new_tokens + reserve)
        self._prefill_messages(messages, raw, request.tools, segments[:-1], encoded[:-1], turn)
        return encoded[-1]

    def _prefill_messages(
        self,
        messages: list[Message],
        raw: list[Any],
        tools: list[dict] | None,
        segments: list[Segment],
        encoded: list[Marked],
        turn: TurnStats,
    ) -> None:
        start = time.perf_counter()
        spans = list(self.transcript.spans)
        for segment, (ids, marks) in zip(segments, encoded):
            begin = self._position
            turn.prefilled_tokens += self._prefill(ids, turn, marks)
            spans.extend((begin, self._position) for _ in segment.messages)
        self.transcript = Transcript(messages, tools, self._position, spans, self.model.template, raw)
        turn.prefill_seconds += time.perf_counter() - start

    def _close_turn(self, asked: Transcript, prompt_ids: list[int], reply: Reply, turn: TurnStats) -> None:
        """Make the cache hold exactly the template's rendering of the conversation with the reply in it, and the
        transcript the reply as the caller will send it back (:meth:`Reply.as_message`).

        The sampled tokens may differ from that rendering: a stop string was cut off, the end-of-turn marker was
        not ingested, or the model spelled the text with other tokens. Keep the longest common start and prefill
        the rest of the rendering."""
        start = time.perf_counter()
        message = reply.as_message()
        messages = asked.messages + [message]
        added = self.model.template.continuation(messages, len(asked.messages), False, asked.tools)
        if added is None:
            # The template rewrites earlier turns once a reply follows: fall back to the state before the reply;
            # the next call prefills the reply as a new message.
            self._rollback(asked)
            return
        canonical, marks = self.model.encode_marked(added, [reply.content])
        ingested = prompt_ids + reply.token_ids
        common = 0
        while common < min(len(canonical), len(ingested)) and canonical[common] == ingested[common]:
            common += 1
        if common < len(ingested):
            self._truncate(asked.length + common)
        self._prefill(canonical[common:], turn, marks[common:])
        spans = asked.spans + [(asked.length, self._position)]
        raw = asked.raw + [message]
        self.transcript = Transcript(messages, asked.tools, self._position, spans, self.model.template, raw)
        turn.decode_seconds += time.perf_counter() - start

    # -- the cache -----------------------------------------------------------------------------------------------

    def _prefill(self, ids: list[int], turn: TurnStats, template: list[bool]) -> int:
        """Ingest ``ids`` (``template`` marks the tokens the chat template wrote) in chunks that fit the cache,
        evicting before each; returns how many were new."""
        refeed = self.cache.logits is None and len(self.cache) > 0
        chunk = min(self.config.prefill_chunk, self.cache.max_chunk) - refeed
        for begin in range(0, len(ids), chunk):
            part = slice(begin, begin + chunk)
            turn.evicted_tokens += self.cache.make_room(len(ids[part]) + refeed)
            self._feed(ids[part], template[part])
            refeed = False
            if self.progress is not None:
                self.progress(min(begin + chunk, len(ids)), len(ids))
        return len(ids)

    def _feed(self, ids: list[int], template: list[bool]) -> None:
        """Run ``ids`` through the model into the cache at the next conversation positions."""
        positions = list(range(self._position, self._position + len(ids)))
        if self.cache.logits is None and len(self.cache):
            self.cache.refeed_newest(ids, positions, self.stats.turns, template)
        else:
            self.cache.ingest(ids, positions, self.stats.turns, template)
        self._position += len(ids)

    def _score_first_token(self) -> None:
        """The very first token of a session has no logits before it: give it the highest score of its turn."""
        scores = self.cache.scores
        if scores.numel() and torch.isinf(scores[0]):
            of_turn = scores[(self.cache.turns == self.stats.turns) & torch.isfinite(scores)]
            scores[0] = of_turn.max() if of_turn.numel() else 0.0

    def _truncate(self, position: int) -> None:
        self.cache.truncate(position)
        self._position = position

    def _rollback(self, state: Transcript) -> None:
        self._truncate(state.length)
        self.transcript = state

    @contextmanager
    def _rolling_back(self, turn: TurnStats) -> Iterator[None]:
        """On any failure (an exception, an interrupt, an abandoned stream), cut the cache back to the transcript,
        the last state that matched it, and record the turn's figures so far."""
        try:
            yield
        except BaseException:
            self._rollback(self.transcript)
            self._record(turn)
            raise

    def _new_cache(self) -> SirLLMCache:
        start_size, recent_size = self.config.protected()
        return SirLLMCache(
            self.model.new_runner(self.cache_size),
            self.policy,
            self.cache_size,
            self.model.token_shapes,
            start_size=start_size,
            recent_size=recent_size,
            history_window=self.config.history_window,
            forward=self.model.scheduler.ingest,
        )

    def _reset(self) -> None:
        self.cache = self._new_cache()
        self.transcript = Transcript(template=self.model.template)
        self._position = 0

    def _record(self, turn: TurnStats, completed: bool = False) -> None:
        turn.cache_len = len(self.cache)
        self.stats.add(turn)
        self.stats.turns += completed
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


class AsyncReplyStream:
    """A reply stream for an event loop: the stream runs in a thread of its own (the session lock belongs to the
    thread that opened it) and hands its events over; ``reply`` is set once it is exhausted. ``aclose`` stops
    decoding early, and the session rolls the partial reply back."""

    _DONE = object()

    def __init__(self, open_stream: Callable[[], ReplyStream]):
        self._open = open_stream
        self._queue: asyncio.Queue[Any] | None = None
        self._cancelled = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False
        self.reply: Reply | None = None
        self.session: Session | None = None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._finished:
            raise StopAsyncIteration
        if self._thread is None:
            self._start()
        item = await self._queue.get()
        if item is self._DONE:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()

        def post(item: Any) -> bool:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
                return True
            except RuntimeError:  # the event loop is closed: nobody is reading any more
                return False

        def run() -> None:
            stream = None
            try:
                stream = self._open()
                for event in stream:
                    self.session = stream.session  # known once the first event was asked for
                    if self._cancelled.is_set() or not post(event):
                        break
                self.session = stream.session
                self.reply = stream.reply
                item: Any = self._DONE
            except BaseException as error:  # handed to the consumer, who raises it
                item = error
            finally:
                if stream is not None:
                    stream.close()
            post(item)

        self._thread = threading.Thread(target=run, name="sirllm-stream", daemon=True)
        self._thread.start()

    async def finish(self) -> Reply:
        """Decode to the end and return the reply."""
        async for _ in self:
            pass
        assert self.reply is not None
        return self.reply

    async def aclose(self) -> None:
        """Stop decoding (if still running) and wait until the thread has released the session."""
        self._cancelled.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
