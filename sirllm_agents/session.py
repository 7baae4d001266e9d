"""A Session: one conversation whose KV cache lives across calls.

Each call gets the whole conversation, prefills only what the session has not ingested yet, decodes a reply into
the same bounded cache, and closes the turn so the cache holds exactly the chat-template rendering of the
conversation (minus what was evicted).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from .cache import SirLLMCache
from .generation import GenerationConfig, ReplyText, Sampler, TokenConstraint
from .policies import Policy
from .transcript import Message, Segment, Transcript, normalize_messages

Marked = tuple[list[int], list[bool]]  # token ids, and per token whether the chat template wrote it

if TYPE_CHECKING:
    from .engine import Engine
    from .memory import Memory


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


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_new_tokens reached)
    token_ids: list[int]  # the tokens sampled for the reply, before any stop string was cut off
    stats: TurnStats


class ReplyStream:
    """Iterates over the text pieces of a reply as they are decoded; ``reply`` is set once it is exhausted, and
    ``session`` names the session the reply runs on (for ``Engine.stream``, once the first piece was asked for)."""

    def __init__(self, pieces: Generator[str, None, Reply], session: Session | None = None):
        self._pieces = pieces
        self.session = session
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as done:
            self.reply = done.value
            raise

    def close(self) -> None:
        """Abandon the reply: the session rolls it back (see ``Session.stream``)."""
        self._pieces.close()


class Session:
    """One conversation on an :class:`Engine`, created by ``engine.session(...)``.

    Calls on one session are serialized by a lock; a stream holds it from its first piece until it ends or is
    closed.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        cache_size: int,
        policy: Policy,
        decay: float,
        prefill_chunk: int,
        session_id: str | None = None,
    ):
        self.engine = engine
        self.session_id = session_id or uuid.uuid4().hex
        self.cache_size = cache_size
        self.policy = policy
        self.decay = decay
        self.prefill_chunk = prefill_chunk
        self.cache = SirLLMCache(engine.rotator, policy, cache_size, engine.token_shapes)
        self.transcript = Transcript()
        self.stats = SessionStats()
        self.turn_log: list[TurnStats] = []  # every call's figures, in order (the memory view charts them)
        # Called as progress(done, total) after each prefill chunk of a segment (a long message being ingested).
        self.progress: Callable[[int, int], None] | None = None
        self._logits: torch.Tensor | None = None  # model output after the newest cached token; scores the next one
        self._position = 0  # tokens ingested over the whole conversation
        self._lock = threading.Lock()
        self._owner: int | None = None

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        tools: list[dict] | None = None,
        constraint: TokenConstraint | None = None,
    ) -> Reply:
        """Reply to ``messages``, the whole conversation so far (OpenAI-style dicts). Greedy unless ``temperature``.

        ``tools`` (JSON-schema tool definitions) are rendered by the chat template; ``constraint`` restricts the
        tokens decoded (grammar-constrained tool calls and structured output)."""
        stream = self.stream(
            messages,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            tools=tools,
            constraint=constraint,
        )
        for _ in stream:
            pass
        assert stream.reply is not None
        return stream.reply

    def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        tools: list[dict] | None = None,
        constraint: TokenConstraint | None = None,
    ) -> ReplyStream:
        """Like :meth:`chat`, yielding text pieces as they are decoded (never a broken UTF-8 character, never any
        part of a stop string). The finished :class:`Reply` is ``stream.reply``.

        A stream abandoned midway (closed, garbage-collected, or broken by an exception) rolls the partial reply
        back: the session then holds the conversation up to and including ``messages``, as if no reply had been
        asked for, so the next call may either resend ``messages`` with a new message or retry them as they were.
        """
        config = GenerationConfig(max_new_tokens, temperature, top_p, top_k, seed, stop or [])
        return ReplyStream(self._turn(normalize_messages(messages), config, tools or None, constraint), self)

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
        messages = normalize_messages(messages)
        if isinstance(options, str) or not options or any(not isinstance(o, str) or not o for o in options):
            raise ValueError("options must be a non-empty list of non-empty strings")
        with self._locked():
            turn = TurnStats()
            asked, _ = self._ask(messages, tools or None, turn, reserve=0)
            try:
                option_ids = self._reply_ids(asked, options)
                longest = max(len(ids) for ids in option_ids)
                if longest - 1 > self.cache.max_chunk:
                    raise ValueError(
                        f"an option of {longest} tokens does not fit a cache of {self.cache_size} tokens "
                        f"(at most {self.cache.max_chunk + 1})"
                    )
                start = time.perf_counter()
                turn.evicted_tokens += self.cache.make_room(longest - 1)
                scores = [self._option_logprob(ids) for ids in option_ids]
                turn.decode_seconds += time.perf_counter() - start
                self._rollback(asked)
                self.cache.decay(self.decay)
            except BaseException:
                self._rollback(asked)
                self._record(turn)
                raise
            self._record(turn)
            return scores

    def ingest(self, messages: Sequence[Mapping[str, Any]], *, tools: list[dict] | None = None) -> TurnStats:
        """Prefill ``messages`` (the whole conversation so far) without asking for a reply: context that needs no
        answer, such as a scripted exchange or a document, added as a turn. Only what the session has not ingested
        yet is prefilled (a conversation that does not extend it restarts, as in :meth:`chat`); afterwards the
        session holds ``messages`` and the next call prefills only what follows them. Like a turn, the call
        multiplies the stored scores by ``decay`` once. Returns the call's figures."""
        messages = normalize_messages(messages)
        with self._locked():
            turn = TurnStats()
            self._extend(messages, tools or None, turn, reserve=0)
            turn.input_tokens = self._position
            self.cache.decay(self.decay)
            self._record(turn, completed=True)
            return turn

    def fork(self, session_id: str | None = None) -> Session:
        """An independent copy of this session (cache, transcript, settings and stats), e.g. to try several
        continuations of one conversation; calls on either never change the other. Waits for a call in progress to
        end."""
        with self._locked():
            twin = Session(
                self.engine,
                cache_size=self.cache_size,
                policy=self.policy,
                decay=self.decay,
                prefill_chunk=self.prefill_chunk,
                session_id=session_id,
            )
            twin.cache = self.cache.copy()
            twin.transcript = copy.deepcopy(self.transcript)
            twin.stats = dataclasses.replace(self.stats)
            twin.turn_log = [dataclasses.replace(turn) for turn in self.turn_log]
            twin._logits = None if self._logits is None else self._logits.clone()
            twin._position = self._position
            return twin

    def reset(self) -> None:
        """Forget the conversation: empty cache and transcript (totals in ``stats`` are kept)."""
        with self._locked():
            self._reset()

    def save(self, path: str | os.PathLike) -> None:
        """Write the session (KV cache, scores, transcript, settings, stats) to ``path``, atomically: a crash midway
        leaves any earlier file there intact. ``engine.load_session(path)`` resumes it, in this or another process,
        with the same greedy replies. Waits for a call in progress to end."""
        from .persistence import save_session

        with self._locked():
            save_session(self, path)

    def memory(self) -> Memory:
        """What the cache holds now: the retained tokens in cache order (text, decayed score, turn), every ingested
        token of the conversation with whether it was evicted, and per-turn counts (see :class:`Memory`)."""
        from .memory import session_memory

        with self._locked():
            return session_memory(self)

    def __len__(self) -> int:
        return len(self.cache)

    # -- one call ------------------------------------------------------------------------------------------------

    def _turn(
        self,
        messages: list[Message],
        config: GenerationConfig,
        tools: list[dict] | None,
        constraint: TokenConstraint | None,
    ) -> Generator[str, None, Reply]:
        with self._locked():
            turn = TurnStats()
            # Reserve room for a reply of up to a quarter of the cache before the turn is cached; a longer reply
            # evicts while decoding.
            reserve = min(config.max_new_tokens, self.cache_size // 4)
            asked, prompt_ids = self._ask(messages, tools, turn, reserve)
            try:
                reply = yield from self._decode(config, constraint, turn)
                self._close_turn(asked, prompt_ids, reply, turn)
                self.cache.decay(self.decay)
            except BaseException:
                self._rollback(asked)
                self._record(turn)
                raise
            turn.cache_len = len(self.cache)
            self._record(turn, completed=True)
            return reply

    def _ask(
        self, messages: list[Message], tools: list[dict] | None, turn: TurnStats, reserve: int
    ) -> tuple[Transcript, list[int]]:
        """Ingest ``messages`` and the generation prompt, restarting when they do not extend the transcript, and leave
        the logits that score the reply's first token; ``reserve`` more slots are freed for what follows when the
        turn fits the cache. Returns the transcript of the messages (the state to roll back to) and the prompt's
        token ids. On failure the session is rolled back and the turn recorded."""
        prompt_ids, prompt_marks = self._extend(messages, tools, turn, reserve)
        asked = self.transcript
        try:
            start = time.perf_counter()
            turn.prefilled_tokens += self._prefill(prompt_ids, turn, prompt_marks)
            self._score_first_token()
            turn.prefill_seconds += time.perf_counter() - start
            turn.input_tokens = self._position
        except BaseException:
            self._rollback(asked)
            self._record(turn)
            raise
        return asked, prompt_ids

    def _extend(self, messages: list[Message], tools: list[dict] | None, turn: TurnStats, reserve: int) -> Marked:
        """Ingest the messages the transcript lacks (all of them after a restart) and return the token ids of the
        generation prompt that would follow them, with their template marks (see ``Engine.encode_marked``). On
        failure the session is rolled back and the turn recorded."""
        segments = self.transcript.plan(messages, self.engine.template, tools)
        if segments is None:
            self._reset()
            turn.restarts = 1
            segments = self.transcript.plan(messages, self.engine.template, tools)
            if segments is None:
                raise ValueError(
                    "the chat template's generation prompt does not extend its own rendering of these messages, "
                    "so the conversation cannot be followed incrementally"
                )
        turn.reused_tokens = self.transcript.length
        encoded = [
            self.engine.encode_marked(segment.text, [messages[i]["content"] for i in segment.messages])
            for segment in segments
        ]
        *message_ids, prompt_ids = encoded
        new_tokens = sum(len(ids) for ids, _ in encoded) + 1  # +1: after a rollback the newest cached token is fed again
        if new_tokens + reserve <= self.cache.max_chunk:
            # Make room for the whole turn before any of it is cached, as StreamingLLM and SirLLM do: the turn's
            # own tokens (low-entropy template tokens included) then never compete for a place while it is running.
            turn.evicted_tokens += self.cache.make_room(new_tokens + reserve)
        try:
            self._prefill_messages(messages, tools, segments[:-1], message_ids, turn)
        except BaseException:
            self._rollback(self.transcript)
            self._record(turn)
            raise
        return prompt_ids

    def _prefill_messages(
        self,
        messages: list[Message],
        tools: list[dict] | None,
        segments: list[Segment],
        segment_ids: list[Marked],
        turn: TurnStats,
    ) -> None:
        start = time.perf_counter()
        spans = list(self.transcript.spans)
        for segment, (ids, marks) in zip(segments, segment_ids):
            begin = self._position
            turn.prefilled_tokens += self._prefill(ids, turn, marks)
            spans.extend((begin, self._position) for _ in segment.messages)
        text = self.transcript.text + "".join(s.text for s in segments)
        self.transcript = Transcript(list(messages), tools, text, self._position, spans)
        turn.prefill_seconds += time.perf_counter() - start

    def _decode(
        self, config: GenerationConfig, constraint: TokenConstraint | None, turn: TurnStats
    ) -> Generator[str, None, Reply]:
        sampler = Sampler(config, self.engine.device)
        text = ReplyText(self.engine.tokenizer, config.stop)
        stop_ids = self.engine.stop_token_ids
        # When decoding must evict, free a few slots at once instead of paying for an eviction on every token.
        slack = max(1, min(64, self.cache_size // 16))
        generated: list[int] = []
        finish_reason = "length"
        start = time.perf_counter()
        for _ in range(config.max_new_tokens):
            if constraint is None:
                token = sampler(self._logits)
            else:
                token = sampler(constraint.mask(self._logits))
                constraint.accept(token)
            if token in stop_ids:
                finish_reason = "stop"
                break
            generated.append(token)
            turn.evicted_tokens += self.cache.make_room(1, slack)
            self._forward([token], [self._position])
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped or (constraint is not None and constraint.is_finished()):
                finish_reason = "stop"
                break
        piece = text.finish()
        if piece:
            yield piece
        turn.generated_tokens = len(generated)
        turn.decode_seconds += time.perf_counter() - start
        return Reply(text.text, finish_reason, generated, turn)

    def _close_turn(self, asked: Transcript, prompt_ids: list[int], reply: Reply, turn: TurnStats) -> None:
        """Make the cache hold exactly the template's rendering of the conversation with the reply in it.

        The sampled tokens may differ from that rendering: a stop string was cut off, the end-of-turn marker was
        not ingested, or the model spelled the text with other tokens. Keep the longest common start and prefill
        the rest of the rendering."""
        start = time.perf_counter()
        messages = asked.messages + [{"role": "assistant", "content": reply.text}]
        rendered = self.engine.template.render(messages, add_generation_prompt=False, tools=asked.tools)
        if not rendered.startswith(asked.text):
            # The template rewrites earlier turns once a reply follows: fall back to the state before the reply;
            # the next call prefills the reply as a new message.
            self._rollback(asked)
            return
        canonical, marks = self.engine.encode_marked(rendered[len(asked.text) :], [reply.text])
        ingested = prompt_ids + reply.token_ids
        common = 0
        while common < min(len(canonical), len(ingested)) and canonical[common] == ingested[common]:
            common += 1
        if common < len(ingested):
            self._truncate(asked.length + common)
        self._prefill(canonical[common:], turn, marks[common:])
        spans = asked.spans + [(asked.length, self._position)]
        self.transcript = Transcript(messages, asked.tools, rendered, self._position, spans)
        turn.decode_seconds += time.perf_counter() - start

    def _reply_ids(self, asked: Transcript, options: Sequence[str]) -> list[list[int]]:
        """Token ids of each option as the template renders it in an assistant reply to ``asked``: the text between
        the generation prompt and the end-of-turn marker (found by rendering an empty reply)."""
        template, tools = self.engine.template, asked.tools

        def render_reply(text: str) -> str:
            return template.render(asked.messages + [{"role": "assistant", "content": text}], False, tools)

        prompt = template.render(asked.messages, add_generation_prompt=True, tools=tools)
        end = render_reply("")
        if not end.startswith(prompt):
            raise ValueError("the chat template does not render a reply after its own generation prompt")
        end = end[len(prompt) :]
        option_ids = []
        for option in options:
            reply = render_reply(option)
            if not reply.startswith(prompt):
                raise ValueError("the chat template does not render a reply after its own generation prompt")
            reply = reply[len(prompt) :]
            if end and reply.endswith(end):
                reply = reply[: -len(end)]
            ids = self.engine.encode(reply)
            if not ids:
                raise ValueError(f"option {option!r} renders to no tokens")
            option_ids.append(ids)
        return option_ids

    def _option_logprob(self, ids: list[int]) -> float:
        """``log p(ids)`` after the prompt: the prompt's logits score the first token; the others need a forward of
        all but the last token, which is then cut off the cache again."""
        base, logits = self._position, self._logits
        if len(ids) == 1:
            return -float(_surprisal(logits[None], torch.tensor(ids))[0])
        self._forward(ids[:-1], list(range(base, base + len(ids) - 1)))
        # The forward recorded the surprisal of ids[:-1] with the tokens; its last logits score ids[-1].
        surprisal = float(self.cache.scores[-(len(ids) - 1) :].sum())
        surprisal += float(_surprisal(self._logits[None], torch.tensor(ids[-1:]))[0])
        self.cache.truncate(base)
        self._logits, self._position = logits, base
        return -surprisal

    # -- the cache -----------------------------------------------------------------------------------------------

    def _prefill(self, ids: list[int], turn: TurnStats, template: list[bool]) -> int:
        """Ingest ``ids`` (``template`` marks the tokens the chat template wrote) in chunks that fit the cache,
        evicting before each; returns how many were new."""
        positions = list(range(self._position, self._position + len(ids)))
        first_score = None
        if self._logits is None and len(self.cache):
            # After a rollback the logits after the newest cached token are gone: feed that token again, keeping
            # the score it has, so that its logits score the first new token. (When eviction took the
            # conversation's last token, the newest cached one stands in for it, at its own position.)
            first_score = float(self.cache.scores[-1])
            ids = [int(self.cache.token_ids[-1])] + ids
            positions = [int(self.cache.positions[-1])] + positions
            template = [bool(self.cache.template[-1])] + template
            self.cache.drop_newest()
        chunk = min(self.prefill_chunk, self.cache.max_chunk)
        for begin in range(0, len(ids), chunk):
            part = slice(begin, begin + chunk)
            turn.evicted_tokens += self.cache.make_room(len(ids[part]))
            self._forward(ids[part], positions[part], template[part], first_score if begin == 0 else None)
            if self.progress is not None:
                self.progress(min(begin + chunk, len(ids)), len(ids))
        return len(ids) - (first_score is not None)

    @torch.no_grad()
    def _forward(
        self, ids: list[int], positions: list[int], template: list[bool] | None = None, first_score: float | None = None
    ) -> None:
        """Run ``ids`` through the model into the cache, scoring each token by ``-log p(token | everything before)``:
        the logits at one token score the next, and the previous forward's last logits score the first. ``template``
        marks the tokens the chat template wrote (none by default: generated and option tokens)."""
        device = self.engine.device
        input_ids = torch.tensor([ids], device=device)
        cache_index = torch.arange(len(self.cache), len(self.cache) + len(ids), device=device)
        out = self.engine.model(
            input_ids=input_ids, position_ids=cache_index[None], past_key_values=self.cache.kv, use_cache=True
        )
        logits = out.logits[0].float()
        scores = torch.empty(len(ids), dtype=torch.float32, device=logits.device)
        if len(ids) > 1:
            scores[1:] = _surprisal(logits[:-1], input_ids[0, 1:])
        if first_score is not None:
            scores[0] = first_score
        elif self._logits is not None:
            scores[0] = _surprisal(self._logits[None], input_ids[0, :1])[0]
        else:
            scores[0] = float("inf")  # the session's very first token: see _score_first_token
        marks = torch.zeros(len(ids), dtype=torch.bool) if template is None else torch.tensor(template, dtype=torch.bool)
        self.cache.append(input_ids[0], scores, torch.tensor(positions), self.stats.turns, marks)
        self._logits = logits[-1]
        self._position = positions[-1] + 1

    def _score_first_token(self) -> None:
        """The very first token of a session has no logits before it: give it the highest score of its turn."""
        scores = self.cache.scores
        if scores.numel() and torch.isinf(scores[0]):
            of_turn = scores[(self.cache.turns == self.stats.turns) & torch.isfinite(scores)]
            scores[0] = of_turn.max() if of_turn.numel() else 0.0

    def _truncate(self, position: int) -> None:
        self.cache.truncate(position)
        self._position = position
        self._logits = None

    def _rollback(self, state: Transcript) -> None:
        self._truncate(state.length)
        self.transcript = state

    def _reset(self) -> None:
        self.cache = SirLLMCache(self.engine.rotator, self.policy, self.cache_size, self.engine.token_shapes)
        self.transcript = Transcript()
        self._logits = None
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


def _surprisal(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log softmax(logits)[target]`` per row, without materializing the log-softmax."""
    return logits.logsumexp(-1) - logits.gather(-1, targets[:, None].to(logits.device))[:, 0]
