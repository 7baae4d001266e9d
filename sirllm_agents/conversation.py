"""A conversation followed into its cache: the transcript of the messages ingested and the cache state that holds
them (minus what was evicted), kept in step.

:meth:`Conversation.ask` ingests what a request's messages add (restarting when they do not extend the transcript)
and the generation prompt; :meth:`Conversation.close` makes the cache hold the chat template's rendering of the
reply; :meth:`Conversation.rollback` cuts the cache back to a transcript. Knows nothing of decoding or locks.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from .cache import SirLLMCache
from .cache_state import CacheState, Progress, prefill, score_first_token
from .config import SessionConfig
from .stats import TurnStats
from .transcript import Message, Segment, Transcript

if TYPE_CHECKING:
    from .model import Model
    from .replies import Reply, Request

Marked = tuple[list[int], list[bool]]  # token ids, and per token whether the chat template wrote it


class Conversation:
    """The transcript and the cache state of one conversation on ``model``, bounded as ``config`` says (sized)."""

    def __init__(self, model: Model, config: SessionConfig, state: CacheState | None = None):
        self.model, self.config = model, config
        self.state = state or CacheState(self.new_cache())
        self.transcript = Transcript(template=model.template)
        # Called as progress(done, total) after each prefill chunk of a segment (a long message being ingested).
        self.progress: Progress | None = None

    @property
    def cache(self) -> SirLLMCache:
        return self.state.cache

    def new_cache(self) -> SirLLMCache:
        start_size, recent_size = self.config.protected()
        return SirLLMCache(
            self.model.new_runner(self.config.cache_size),
            self.config.make_policy(),
            self.config.cache_size,
            self.model.token_shapes,
            start_size=start_size,
            recent_size=recent_size,
            history_window=self.config.history_window,
            forward=self.model.scheduler.ingest,
        )

    def copy(self) -> Conversation:
        twin = Conversation(self.model, self.config, self.state.copy())
        twin.transcript = dataclasses.replace(self.transcript, raw=list(self.transcript.raw))
        return twin

    def reset(self) -> None:
        """Forget the conversation: an empty cache and transcript (the turn count goes on)."""
        self.state = CacheState(self.new_cache(), turn=self.state.turn)
        self.transcript = Transcript(template=self.model.template)

    def rollback(self, to: Transcript) -> None:
        """Cut the cache back to ``to``, a transcript it held (the last state that matched it)."""
        self.state.truncate(to.length)
        self.transcript = to

    def ask(self, request: Request, turn: TurnStats, reserve: int) -> tuple[Transcript, list[int]]:
        """Ingest the request's messages and the generation prompt, leaving the logits that score the reply's first
        token; ``reserve`` more slots are freed for what follows when the turn fits the cache. Returns the transcript
        of the messages (the state to roll back to) and the prompt's token ids."""
        prompt_ids, prompt_marks = self.extend(request, turn, reserve)
        start = time.perf_counter()
        turn.evicted_tokens += self._prefill(prompt_ids, prompt_marks)
        turn.prefilled_tokens += len(prompt_ids)
        score_first_token(self.state)
        turn.prefill_seconds += time.perf_counter() - start
        turn.input_tokens = self.state.position
        return self.transcript, prompt_ids

    def extend(self, request: Request, turn: TurnStats, reserve: int) -> Marked:
        """Ingest the messages the transcript lacks (all of them after a restart) and return the token ids of the
        generation prompt that would follow them, with their template marks (see ``Model.encode_marked``)."""
        messages, raw = self.transcript.recognise(request.messages)
        template = self.model.template
        segments = self.transcript.plan(messages, template, request.tools)
        if segments is None:
            self.reset()
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
        new_tokens = sum(len(ids) for ids, _ in encoded) + self.state.refeed
        if new_tokens + reserve <= self.cache.max_chunk:
            # Make room for the whole turn before any of it is cached, as StreamingLLM and SirLLM do: the turn's
            # own tokens (low-entropy template tokens included) then never compete for a place while it is running.
            turn.evicted_tokens += self.cache.make_room(new_tokens + reserve)
        self._ingest_messages(messages, raw, request.tools, segments[:-1], encoded[:-1], turn)
        return encoded[-1]

    def close(self, asked: Transcript, prompt_ids: list[int], reply: Reply, turn: TurnStats) -> None:
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
            self.rollback(asked)
            return
        canonical, marks = self.model.encode_marked(added, [reply.content])
        ingested = prompt_ids + reply.token_ids
        common = 0
        while common < min(len(canonical), len(ingested)) and canonical[common] == ingested[common]:
            common += 1
        if common < len(ingested):
            self.state.truncate(asked.length + common)
        turn.evicted_tokens += self._prefill(canonical[common:], marks[common:])
        spans = asked.spans + [(asked.length, self.state.position)]
        raw = asked.raw + [message]
        self.transcript = Transcript(messages, asked.tools, self.state.position, spans, self.model.template, raw)
        turn.decode_seconds += time.perf_counter() - start

    def _ingest_messages(
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
            begin = self.state.position
            turn.evicted_tokens += self._prefill(ids, marks)
            turn.prefilled_tokens += len(ids)
            spans.extend((begin, self.state.position) for _ in segment.messages)
        self.transcript = Transcript(messages, tools, self.state.position, spans, self.model.template, raw)
        turn.prefill_seconds += time.perf_counter() - start

    def _prefill(self, ids: list[int], template: list[bool]) -> int:
        return prefill(self.state, ids, template, self.config.prefill_chunk, self.progress)
