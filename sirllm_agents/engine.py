"""The Engine: one loaded model, its tokenizer and chat template, shared by any number of sessions."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from . import loading
from .persistence import load_session
from .policies import Policy, make_policy
from .pool import SessionPool
from .rope import KeyRotator
from .session import Reply, ReplyStream, Session
from .token_shapes import TokenShapes
from .transcript import ChatTemplate

DEFAULT_CACHE_SIZE = 1024
MIN_FREE_SLOTS = 16  # room a cache keeps beyond sinks and protected recent tokens, so prefill can make progress
DEFAULT_MAX_LIVE_SESSIONS = 16
DEFAULT_MAX_SPILLED_SESSIONS = 1024
# The cache settings of :meth:`Engine.session` that a wrapper exposes as its own fields and passes on.
SESSION_SETTINGS = ("cache_size", "start_size", "recent_size", "decay", "policy")


class Engine:
    """A local causal LM ready to serve stateful chat sessions.

    ``Engine()`` loads the embedded SmolLM2-135M-Instruct (offline); ``Engine(model=...)`` takes a local folder, a hub
    id, a ``.gguf`` file, or an already loaded ``PreTrainedModel`` together with ``tokenizer=``.

    The engine also holds a pool of conversations for :meth:`chat` / :meth:`stream` / :meth:`achat`: each call goes
    to the session named by ``session_id``, else to the one whose transcript is the longest prefix of its messages.
    At most ``max_live_sessions`` stay in memory; the least recently used idle one is saved to ``spill_dir`` (a
    private temporary folder by default) and read back when its conversation returns. At most
    ``max_spilled_sessions`` files are kept: past that the longest-idle one is deleted, and if its conversation
    returns it starts afresh from the messages sent (the right reply, after a full re-prefill). Pooled sessions are made with
    ``session_options`` (the keywords of :meth:`session`).
    """

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel | None = None,
        *,
        tokenizer=None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
        max_live_sessions: int = DEFAULT_MAX_LIVE_SESSIONS,
        max_spilled_sessions: int = DEFAULT_MAX_SPILLED_SESSIONS,
        spill_dir: str | os.PathLike | None = None,
        session_options: Mapping[str, Any] | None = None,
    ):
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if isinstance(model, PreTrainedModel):
            if tokenizer is None:
                raise ValueError("an already loaded model needs its tokenizer: Engine(model, tokenizer=...)")
            self.model, self.tokenizer = model.eval(), tokenizer
            self.model_name = model.config.name_or_path or model.config.model_type
        else:
            self.model, self.tokenizer, self.model_name = loading.load(
                model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
            )
        if getattr(self.tokenizer, "backend_tokenizer", None) is None:
            raise ValueError(f"{self.model_name}: sirllm-agents needs a fast (tokenizers) tokenizer")
        self.template = ChatTemplate(self.tokenizer, chat_template)
        self.rotator = KeyRotator.from_model(self.model)
        self.token_shapes = TokenShapes.from_tokenizer(self.tokenizer, self.model.get_input_embeddings().num_embeddings)
        self.device = self.model.device
        config = self.model.config.get_text_config(decoder=True)
        self.max_length: int = config.max_position_embeddings
        self.stop_token_ids: frozenset[int] = self._stop_token_ids()
        self.pool = SessionPool(
            self,
            max_live_sessions=max_live_sessions,
            max_spilled_sessions=max_spilled_sessions,
            spill_dir=spill_dir,
            session_options=session_options or {},
        )

    def session(
        self,
        cache_size: int | None = None,
        start_size: int = 4,
        recent_size: int = 0,
        decay: float = 1.0,
        policy: str | Policy = "sirllm",
        prefill_chunk: int = 512,
        session_id: str | None = None,
    ) -> Session:
        """A new conversation with a KV cache of at most ``cache_size`` tokens.

        ``policy`` chooses who stays when the cache is full: ``"sirllm"`` (sinks + highest token entropy),
        ``"streaming"`` (sinks + newest) or ``"full"`` (never evict; ``cache_size`` defaults to the model's maximum
        length). ``decay`` multiplies every stored score after each turn so old key tokens can fade.

        The session is the caller's own, outside the engine's pool (see :meth:`chat` for pooled conversations).
        """
        if isinstance(policy, str):
            for name, value in (("start_size", start_size), ("recent_size", recent_size)):
                if not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            policy = make_policy(policy, start_size, recent_size)
        if cache_size is None:
            cache_size = self.max_length if policy.name == "full" else min(DEFAULT_CACHE_SIZE, self.max_length)
        reserved = policy.start_size + policy.recent_size
        if not isinstance(cache_size, int) or cache_size < reserved + MIN_FREE_SLOTS:
            raise ValueError(
                f"cache_size must be at least start_size + recent_size + {MIN_FREE_SLOTS} = "
                f"{reserved + MIN_FREE_SLOTS}, got {cache_size!r}"
            )
        if cache_size > self.max_length:
            raise ValueError(
                f"cache_size {cache_size} is larger than the model's maximum length {self.max_length}; cache positions "
                "past it were never trained"
            )
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if not isinstance(prefill_chunk, int) or prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        return Session(
            self, cache_size=cache_size, policy=policy, decay=decay, prefill_chunk=prefill_chunk, session_id=session_id
        )

    # -- the pool of conversations -------------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        session_id: str | None = None,
        *,
        tools: list[dict] | None = None,
        session_options: Mapping[str, Any] | None = None,
        **generation: Any,
    ) -> Reply:
        """Reply to ``messages`` (the whole conversation so far) on the pooled session for them: the one named
        ``session_id`` (created when new), else the one whose transcript is the longest prefix of ``messages``, else
        a new one. A session made by the call takes ``session_options`` (the keywords of :meth:`session`; default:
        the engine's ``session_options``); one that exists keeps its own. ``generation`` takes the keywords of
        :meth:`Session.chat`. Thread-safe; calls on one session are serialized, calls on different sessions run
        concurrently."""
        with self.pool.use(messages, tools, session_id, session_options) as session:
            return session.chat(messages, tools=tools, **generation)

    def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        session_id: str | None = None,
        *,
        tools: list[dict] | None = None,
        session_options: Mapping[str, Any] | None = None,
        **generation: Any,
    ) -> ReplyStream:
        """Like :meth:`chat`, yielding text pieces (see :meth:`Session.stream`). The session is chosen when the
        first piece is asked for (``stream.session`` from then on) and stays pinned in memory until the stream ends
        or is closed."""

        def pieces() -> Generator[str, None, Reply]:
            with self.pool.use(messages, tools, session_id, session_options) as session:
                stream.session = session
                return (yield from session.stream(messages, tools=tools, **generation))

        stream = ReplyStream(pieces())
        return stream

    async def achat(
        self,
        messages: Sequence[Mapping[str, Any]],
        session_id: str | None = None,
        *,
        tools: list[dict] | None = None,
        session_options: Mapping[str, Any] | None = None,
        **generation: Any,
    ) -> Reply:
        """:meth:`chat` in a worker thread, so an event loop keeps serving other conversations meanwhile."""
        return await asyncio.to_thread(
            self.chat, messages, session_id, tools=tools, session_options=session_options, **generation
        )

    def route(
        self,
        messages: Sequence[Mapping[str, Any]],
        session_id: str | None = None,
        *,
        tools: list[dict] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> Session:
        """The pooled session a call with these arguments would use (created or read back when needed), for
        inspection. Call through :meth:`chat` / :meth:`stream`: a session used directly may be spilled to disk once
        idle, and the pool would not see what it did afterwards."""
        return self.pool.route(messages, tools, session_id, session_options)

    def load_session(self, path: str | os.PathLike, session_id: str | None = None) -> Session:
        """Resume a session saved with :meth:`Session.save` (by this or another process) and add it to the pool
        under ``session_id`` (default: the id it was saved with), replacing any session of that id. Raises
        ``SessionFileError`` (a ``ValueError``), changing nothing, for a missing, truncated or corrupted file or one
        saved from another model or dtype."""
        session = load_session(self, path, session_id)
        self.pool.add(session)
        return session

    def drop_session(self, session_id: str) -> bool:
        """Forget a pooled session (in memory or spilled); True when there was one."""
        return self.pool.drop(session_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered chat text (its special tokens are already written in it)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_marked(self, text: str, contents: Sequence[str]) -> tuple[list[int], list[bool]]:
        """Token ids of rendered chat text, and per token whether the chat template wrote it (role markers, ends of
        turn) rather than one of ``contents``, the messages' texts in the order rendered. When a content cannot be
        found verbatim (a template that rewrites it, a message that is only tool calls), no token is marked."""
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        ranges, cursor = [], 0
        for content in contents:
            start = text.find(content, cursor) if content else -1
            if start < 0:
                return ids, [False] * len(ids)
            ranges.append((start, start + len(content)))
            cursor = start + len(content)
        marks = [not any(begin < stop and end > start for start, stop in ranges) for begin, end in encoding["offset_mapping"]]
        return ids, marks

    def _stop_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if source is not None:
                ids.update(source if isinstance(source, list) else [source])
        return frozenset(ids)
