"""SirLLM: a LlamaIndex function-calling LLM on a local model whose KV cache lives across chat and agent steps."""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, model_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.types import Model
from pydantic import InstanceOf

from sirllm_agents import (
    AsyncReplyStream,
    Engine,
    GenerationConfig,
    Reply,
    ReplyStream,
    Session,
    SessionConfig,
    SessionStats,
    TextDelta,
)
from sirllm_agents.penalties import Penalties
from sirllm_agents.replies import normalize_tool_choice

from .utils import raw_response, to_session_messages

if TYPE_CHECKING:
    from llama_index.core.prompts import BasePromptTemplate
    from llama_index.core.tools.types import BaseTool

# LlamaIndex sizes chat memory and prompts from ``context_window`` (memory keeps about 0.75 of it). A SirLLM session
# takes a history of any length: prefill evicts the lowest-entropy tokens so the cache never exceeds ``cache_size``,
# and each call prefills only the new messages as long as the history is sent back whole. Trimming the history would
# change its first messages and force a full re-prefill, so SirLLM reports no practical limit: the largest int32.
UNBOUNDED_CONTEXT_WINDOW = 2**31 - 1

REPETITION_KWARGS = Penalties.names()
GENERATION_KWARGS = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", *REPETITION_KWARGS})
TOOL_KWARGS = frozenset({"tools", "tool_choice"})
CALL_KWARGS = GENERATION_KWARGS | TOOL_KWARGS | {"session_id"}

# Set while structured_predict runs, so its calls run one-off (on a copy of a session, dropped afterwards) and leave
# the chat session as it was.
_one_off: contextvars.ContextVar[bool] = contextvars.ContextVar("sirllm_one_off", default=False)


class SirLLM(FunctionCallingLLM):
    """A local chat model whose KV cache lives across calls, bounded by SirLLM token-entropy eviction.

    Chat calls run on one session that follows the conversation: each call prefills only the messages it has not
    seen, so send the whole history every time (LlamaIndex chat engines and agents do). ``complete`` and
    ``structured_predict`` run one-off (``Engine.stream(one_off=True)``): on a copy of the session their messages
    continue, if any, dropped afterwards, so they never disturb the chat cache.

    For many conversations on one loaded model, name them: ``session_id=`` (a field, or a keyword of a chat call,
    which wins) runs the chat on the engine's pooled session of that id, made with this LLM's cache settings when
    new. The engine keeps at most ``max_live_sessions`` in memory and writes idle ones to disk, reading them back
    exactly when their conversation returns (see ``Engine.chat``). Without an id, one ``SirLLM`` follows one
    conversation at a time; several can share an engine: ``SirLLM(engine=llm.engine)``.

    Examples:
        ```python
        from llama_index.core.chat_engine import SimpleChatEngine
        from llama_index.llms.sirllm import SirLLM

        llm = SirLLM()  # the embedded SmolLM2-135M-Instruct
        chat = SimpleChatEngine.from_defaults(llm=llm)
        print(chat.chat("My name is Ada."))
        print(llm.session.stats)  # reused (cached) vs prefilled tokens, evictions, cache length
        ```
    """

    model: str | None = Field(
        default=None,
        description="A local folder, a hub id or a .gguf file; None loads the embedded SmolLM2-135M-Instruct.",
    )
    config: InstanceOf[SessionConfig] = Field(
        default_factory=SessionConfig,
        description="How each session's KV cache is bounded (sirllm_agents.SessionConfig); its fields (cache_size, "
        "start_size, recent_size, decay, policy, prefill_chunk) are also taken as keywords.",
    )
    max_new_tokens: int = Field(
        default=GenerationConfig.max_new_tokens, gt=0, description="Most tokens decoded for one reply."
    )
    temperature: float = Field(
        default=GenerationConfig.temperature, ge=0.0, description="Sampling temperature; 0 decodes greedily."
    )
    top_p: float = Field(default=GenerationConfig.top_p, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(
        default=GenerationConfig.top_k, ge=0, description="Sample among the k likeliest tokens; 0 turns it off."
    )
    seed: int | None = Field(default=None, description="Makes sampling repeatable.")
    stop: list[str] | None = Field(default=None, description="Strings that end a reply (cut off, never shown).")
    frequency_penalty: float | None = Field(
        default=None,
        description="OpenAI's: lowers a token's logit by this much per time it occurs in the reply. The repetition "
        "settings left at None are off for free text and take sirllm_agents.penalties.CONSTRAINED_PENALTIES for tool "
        "calls and structured output.",
    )
    presence_penalty: float | None = Field(
        default=None, description="OpenAI's: lowers the logit of every token already in the reply by this much."
    )
    repeat_penalty: float | None = Field(
        default=None,
        description="llama.cpp's: divides positive logits (multiplies negative ones) of the reply's last "
        "repeat_last_n tokens.",
    )
    repeat_last_n: int | None = Field(default=None, description="The window of repeat_penalty (-1: the whole reply).")
    dry_multiplier: float | None = Field(
        default=None,
        description="DRY: lowers the token that would extend a repetition of at least dry_allowed_length tokens by "
        "dry_multiplier * dry_base ** (length - dry_allowed_length).",
    )
    dry_base: float | None = Field(default=None, description="DRY's growth per repeated token.")
    dry_allowed_length: int | None = Field(default=None, description="The longest repetition DRY leaves alone.")
    dry_penalty_last_n: int | None = Field(default=None, description="How far back DRY looks (-1: the whole reply).")
    dry_sequence_breakers: list[str] | None = Field(
        default=None, description="Texts no repetition reaches back past (DRY)."
    )
    context_window: int = Field(
        default=UNBOUNDED_CONTEXT_WINDOW,
        gt=0,
        description="What LlamaIndex is told the model takes. Unbounded by default: eviction keeps any history "
        "within cache_size. Set it (e.g. to cache_size) to make LlamaIndex pack prompts that fit without eviction.",
    )
    backend: str = Field(
        default="auto",
        description="What runs the model when SirLLM loads it: 'torch', 'llamacpp' (GGUF files, CPU), or 'auto' "
        "(llama.cpp for a GGUF when installed and no torch device or dtype is asked for).",
    )
    device: str = Field(default="cpu", description="Where the model runs when SirLLM loads it (torch backend).")
    dtype: str | None = Field(default=None, description="Weights' dtype when SirLLM loads the model (torch backend).")
    session_id: str | None = Field(
        default=None,
        min_length=1,
        description="Run chat calls on the engine's pooled session of this id (a chat call's session_id= wins); "
        "None: on this LLM's own session.",
    )

    _engine: Engine = PrivateAttr()
    _session_id: str = PrivateAttr()  # this LLM's own chat session, in the engine's pool

    def __init__(self, *, engine: Engine | None = None, **kwargs: Any) -> None:
        """Load ``model`` (or the embedded one), or share the already loaded ``engine``; other fields as above."""
        if engine is not None and kwargs.get("model") is not None:
            raise ValueError("pass either engine= (an already loaded model) or model=, not both")
        super().__init__(**kwargs)
        if engine is None:
            engine = Engine.shared(self.model, backend=self.backend, device=self.device, dtype=self.dtype)
        self._engine = engine
        self._session_id = f"sirllm-{uuid.uuid4().hex}"

    @model_validator(mode="before")
    @classmethod
    def _gather_cache_settings(cls, values: Any) -> Any:
        """``SirLLM(cache_size=..., decay=...)``: the cache settings become one ``SessionConfig``."""
        return SessionConfig.gather(values)

    @classmethod
    def class_name(cls) -> str:
        return "SirLLM"

    @property
    def engine(self) -> Engine:
        """The loaded model, tokenizer and chat template; share it with other SirLLMs or ChatSirLLM."""
        return self._engine

    @property
    def session(self) -> Session:
        """The chat session (the pooled one named by the ``session_id`` field, if set): ``session.stats`` holds
        cached vs prefilled tokens, evictions and the cache length."""
        return self._engine.route([], self.session_id or self._session_id, config=self.config)

    @property
    def stats(self) -> SessionStats:
        """Totals over the chat session's calls (same as ``session.stats``)."""
        return self.session.stats

    def reset(self) -> None:
        """Start the chat session afresh: empty cache and transcript (its totals are kept)."""
        self.session.reset()

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self._engine.model.name,
            system_role=MessageRole.SYSTEM,
        )

    # -- chat ----------------------------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Reply to ``messages``, the whole conversation so far; keyword arguments override generation fields."""
        return self._call(messages, kwargs).chat()

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Like :meth:`chat`, yielding a response per decoded piece; the last carries usage and tool calls.

        Abandoning the stream midway rolls the partial reply back out of the session."""
        call = self._call(messages, kwargs)
        return call.responses(call.stream())

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """:meth:`chat` in a worker thread; concurrent calls on one session wait for each other."""
        return await asyncio.to_thread(self._call(messages, kwargs).chat)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        """:meth:`stream_chat` decoding in a thread of its own, so the event loop stays free."""
        call = self._call(messages, kwargs)
        return call.aresponses(call.astream())

    # -- tools ---------------------------------------------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The ``chat`` arguments for a call that may use ``tools``.

        ``tool_required=True`` (or ``tool_choice="required"``, or a tool's name) decodes under the core's tool-call
        grammar, so the reply is always one valid call; ``tool_choice="none"`` keeps the tools in the prompt (the
        cache stays valid) but reads no call from the reply."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg
            )
        specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        if tool_choice is None and tool_required:
            tool_choice = "required"
        return {"messages": messages, "tools": specs or None, "tool_choice": tool_choice, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Keep only the first tool call unless parallel calls are allowed."""
        calls = response.message.additional_kwargs.get("tool_calls")
        if not allow_parallel_tool_calls and calls and len(calls) > 1:
            response.message.additional_kwargs["tool_calls"] = calls[:1]
        return response

    def predict_and_call(
        self, tools: Sequence[BaseTool], *args: Any, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> Any:
        """Like LlamaIndex's, but when no call is an error (the default) the call is required, so decoding is
        constrained to a valid one instead of hoping for it."""
        return super().predict_and_call(
            tools, *args, error_on_no_tool_call=error_on_no_tool_call, **_require_call(error_on_no_tool_call, kwargs)
        )

    async def apredict_and_call(
        self, tools: Sequence[BaseTool], *args: Any, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> Any:
        """Async :meth:`predict_and_call`."""
        return await super().apredict_and_call(
            tools, *args, error_on_no_tool_call=error_on_no_tool_call, **_require_call(error_on_no_tool_call, kwargs)
        )

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The tool calls parsed from the reply, from ``message.additional_kwargs["tool_calls"]``."""
        calls = response.message.additional_kwargs.get("tool_calls") or []
        if not calls and error_on_no_tool_call:
            raise ValueError(f"expected at least one tool call, but the reply has none: {response.message.content!r}")
        return [
            ToolSelection(
                tool_id=call["id"], tool_name=call["function"]["name"], tool_kwargs=call["function"]["arguments"]
            )
            for call in calls
        ]

    # -- structured output ---------------------------------------------------------------------------------------

    def structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """An ``output_cls`` instance, decoded as a grammar-constrained tool call, one-off."""
        with _one_off_calls():
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)

    async def astructured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """Async :meth:`structured_predict`."""
        with _one_off_calls():
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)

    # -- completion ----------------------------------------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """One-turn chat, one-off (the chat session's cache is left as it was)."""
        return _completion(self._call(self._prompt_messages(prompt, formatted), kwargs, one_off=True).chat())

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Streaming :meth:`complete`."""
        call = self._call(self._prompt_messages(prompt, formatted), kwargs, one_off=True)
        return (_completion(response) for response in call.responses(call.stream()))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Async :meth:`complete`."""
        call = self._call(self._prompt_messages(prompt, formatted), kwargs, one_off=True)
        return _completion(await asyncio.to_thread(call.chat))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        """Async streaming :meth:`complete`."""
        call = self._call(self._prompt_messages(prompt, formatted), kwargs, one_off=True)
        chat_responses = call.aresponses(call.astream())

        async def responses() -> CompletionResponseAsyncGen:
            async for response in chat_responses:
                yield _completion(response)

        return responses()

    # -- internals -----------------------------------------------------------------------------------------------

    def _prompt_messages(self, prompt: str, formatted: bool) -> list[ChatMessage]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        return [ChatMessage(role=MessageRole.USER, content=prompt)]

    def _call(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], one_off: bool = False) -> _Call:
        unknown = sorted(set(kwargs) - CALL_KWARGS)
        if unknown:
            raise TypeError(
                f"SirLLM got unexpected keyword argument(s) {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(CALL_KWARGS))}"
            )
        if one_off and "session_id" in kwargs:
            raise TypeError("completions run one-off, on no chat session: session_id= names a chat session")
        session_id = kwargs.get("session_id", self.session_id)
        if session_id is not None and not (isinstance(session_id, str) and session_id):
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        options: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,
            **{name: getattr(self, name) for name in REPETITION_KWARGS},
        }
        options.update((key, value) for key, value in kwargs.items() if key in GENERATION_KWARGS)
        one_off = one_off or _one_off.get()
        if one_off:
            session_id = None  # the session the messages continue, if any
        elif session_id is None:
            session_id = self._session_id
        tools = kwargs.get("tools")
        choice = normalize_tool_choice(kwargs.get("tool_choice"), tools)
        options.update(tools=tools, tool_choice=choice, one_off=one_off)
        return _Call(self, session_id, to_session_messages(messages), options)


class _Call:
    """One call: the pooled session it runs on (None: the one its messages continue), the converted messages and
    options, and how replies become responses."""

    def __init__(self, llm: SirLLM, session_id: str | None, messages: list[dict[str, Any]], options: dict[str, Any]):
        self.llm = llm
        self.session_id = session_id
        self.messages = messages
        self.options = options

    def stream(self) -> ReplyStream:
        """The reply stream (the session is chosen, and pinned, once decoding starts)."""
        return self.llm.engine.stream(self.messages, self.session_id, config=self.llm.config, **self.options)

    def astream(self) -> AsyncReplyStream:
        return self.llm.engine.astream(self.messages, self.session_id, config=self.llm.config, **self.options)

    def chat(self) -> ChatResponse:
        """The whole reply as one response."""
        stream = self.stream()
        return self.response(stream.finish(), stream.session)

    def response(self, reply: Reply, session: Session, delta: str | None = None) -> ChatResponse:
        """The final response: the reply's content, its tool calls in ``additional_kwargs["tool_calls"]``, usage and
        the session's figures. A required call cut off by ``max_new_tokens`` is an error: there is no call to run."""
        if self.options["tool_choice"] not in ("auto", "none") and reply.finish_reason == "length":
            raise ValueError(
                f"the required tool call was cut off at max_new_tokens={self.options['max_new_tokens']}: raise "
                f"max_new_tokens. Reply so far: {reply.text!r}"
            )
        extra: dict[str, Any] = {}
        if reply.tool_calls:
            extra["tool_calls"] = [call.as_message_call() for call in reply.tool_calls]
        message = ChatMessage(role=MessageRole.ASSISTANT, content=reply.content, additional_kwargs=extra)
        raw = raw_response(reply.stats, reply.finish_reason, self.llm.engine.model.name, session)
        return ChatResponse(message=message, raw=raw, delta=delta)

    def responses(self, stream: ReplyStream) -> ChatResponseGen:
        """Responses for a stream: one per piece of content, the last carrying the finished reply (one piece is held
        back for it)."""
        pieces = _Pieces()
        try:
            for event in stream:
                if isinstance(event, TextDelta) and (chunk := pieces.push(event.text)) is not None:
                    yield chunk
            yield self.response(stream.reply, stream.session, delta=pieces.last)
        finally:
            stream.close()

    async def aresponses(self, stream: AsyncReplyStream) -> ChatResponseAsyncGen:
        """:meth:`responses` for an event loop (decoded on a thread of the core's)."""
        pieces = _Pieces()
        try:
            async for event in stream:
                if isinstance(event, TextDelta) and (chunk := pieces.push(event.text)) is not None:
                    yield chunk
            yield self.response(stream.reply, stream.session, delta=pieces.last)
        finally:
            await stream.aclose()


class _Pieces:
    """Holds the newest streamed piece back until the next arrives, so the last response can carry the reply."""

    def __init__(self) -> None:
        self.text = ""
        self.last = ""
        self._held = False

    def push(self, piece: str) -> ChatResponse | None:
        chunk = None
        if self._held:
            message = ChatMessage(role=MessageRole.ASSISTANT, content=self.text)
            chunk = ChatResponse(message=message, delta=self.last)
        self.text += piece
        self.last, self._held = piece, True
        return chunk


def _require_call(error_on_no_tool_call: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    if error_on_no_tool_call and "tool_required" not in kwargs and kwargs.get("tool_choice") is None:
        return {**kwargs, "tool_required": True}
    return kwargs


@contextmanager
def _one_off_calls() -> Iterator[None]:
    token = _one_off.set(True)
    try:
        yield
    finally:
        _one_off.reset(token)


def _completion(response: ChatResponse) -> CompletionResponse:
    return CompletionResponse(
        text=response.message.content or "",
        delta=response.delta,
        raw=response.raw,
        additional_kwargs=response.message.additional_kwargs,
    )
