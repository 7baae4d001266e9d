"""SirLLM chat model: a local model whose KV cache lives across an agent's steps.

A converter: LangChain messages and call options in, ``sirllm_agents`` events and replies out. Tools, tool choice,
structured output, streaming and cache reuse all happen in the core's one request path.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import (
    BaseChatModel,
    LangSmithParams,
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
    ensure_config,
)
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, InstanceOf, PrivateAttr, model_validator

from sirllm_agents import Engine, GenerationConfig, Reply, Session, SessionConfig, TextDelta, ToolCallDelta
from sirllm_agents.penalties import Penalties
from sirllm_agents.replies import normalize_tool_choice

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Run-config keys that name the conversation a call belongs to, in order of precedence.
SESSION_ID_KEYS = ("session_id", "thread_id")
REPETITION_OPTIONS = Penalties.names()
GENERATION_OPTIONS = {
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    **{name: name for name in REPETITION_OPTIONS},
}
_TEXT_ONLY = "ChatSirLLM runs a text-only model"
_SKIPPED_BLOCKS = ("tool_use", "tool_call", "tool_call_chunk", "function_call", "reasoning", "thinking")


class ChatSirLLM(BaseChatModel):
    """A local chat model that keeps one conversation's KV cache across calls, bounded by SirLLM eviction.

    Agent frameworks send the whole conversation on every step; ``ChatSirLLM`` matches it against the conversation
    it already holds and prefills only the new messages, so step 200 of an agent loop costs what its new turn costs.
    ``usage_metadata["input_token_details"]["cache_read"]`` says how many prompt tokens were reused.

    Setup:
        .. code-block:: bash

            pip install -e integrations/langchain

    Instantiate:
        .. code-block:: python

            from langchain_sirllm import ChatSirLLM

            llm = ChatSirLLM()  # the embedded SmolLM2-135M-Instruct, offline
            llm = ChatSirLLM(model="Qwen/Qwen2.5-1.5B-Instruct", cache_size=2048, decay=0.9)
            llm = ChatSirLLM(engine=engine)  # share one loaded model with other wrappers

        The cache settings (``cache_size``, ``start_size``, ``recent_size``, ``decay``, ``policy``,
        ``prefill_chunk``) are those of :class:`sirllm_agents.SessionConfig`, given as keywords or as
        ``config=SessionConfig(...)``; they are kept together in ``llm.config``.

    Invoke and stream:
        .. code-block:: python

            llm.invoke("Name a colour.")
            for chunk in llm.stream("Tell me a story."):
                print(chunk.text, end="")

    Tool calling (grammar-constrained when a call is required):
        .. code-block:: python

            llm.bind_tools([get_weather], tool_choice="any").invoke("Weather in Paris?").tool_calls

    Structured output:
        .. code-block:: python

            llm.with_structured_output(Joke).invoke("Tell me a joke about cats.")

    Many conversations:
        A call whose run config names a conversation, ``configurable={"session_id": ...}`` or (as LangGraph
        checkpointers use) ``{"thread_id": ...}``, runs on the engine's pooled session of that id, made with this
        model's cache settings when new (see ``Engine.chat``: idle sessions beyond ``max_live_sessions`` are written
        to disk and read back exactly). ``session_id`` wins over ``thread_id``, so a side task in a thread (a
        summary, a title) can take an id of its own and leave the thread's cache as it is.

        .. code-block:: python

            llm.invoke(messages, config={"configurable": {"thread_id": "user-42"}})

        A call that names none runs on this instance's own session (a pooled one, under an id of the instance's);
        ``bind_tools`` shares it. ``with_structured_output`` runs each call on a copy of the session its messages
        continue (``Engine.stream(one_off=True)``), dropped afterwards, so the agent's cache is left as it was. Calls
        on one session are serialized.
    """

    model: str | None = None
    """Model to load: a local folder, a Hugging Face hub id, or a ``.gguf`` file. ``None``: the embedded
    SmolLM2-135M-Instruct. Ignored when ``engine`` is given."""
    engine: Engine | None = Field(default=None, exclude=True)
    """An already loaded engine to share between wrappers. Without one, engines are shared per ``model``,
    ``backend`` and ``threads`` (``Engine.shared``)."""
    backend: str | None = None
    """What runs the model: ``"llamacpp"``, ``"torch"`` or ``None`` (``"auto"``: llama.cpp for a GGUF file). Ignored
    when ``engine`` is given."""
    threads: int | None = None
    """llama.cpp's threads (default: torch's thread count). Ignored when ``engine`` is given."""
    config: InstanceOf[SessionConfig] = Field(default_factory=SessionConfig)
    """How the session's KV cache is bounded (see :class:`sirllm_agents.SessionConfig`)."""
    temperature: float = GenerationConfig.temperature
    """Sampling temperature; 0 (the default) decodes greedily."""
    max_tokens: int = GenerationConfig.max_new_tokens
    """Most tokens to generate per reply."""
    top_p: float = GenerationConfig.top_p
    top_k: int = GenerationConfig.top_k
    seed: int | None = None
    """Seed for sampling when ``temperature > 0``, for repeatable replies."""
    stop: list[str] | None = None
    """Stop strings: the reply ends before the first one, which is not included."""
    frequency_penalty: float | None = None
    """OpenAI's: lowers a token's logit by this much per time it already occurs in the reply. The repetition
    settings left at ``None`` are off for free text and take ``sirllm_agents.penalties.CONSTRAINED_PENALTIES`` for
    tool calls and structured output."""
    presence_penalty: float | None = None
    """OpenAI's: lowers the logit of every token already in the reply by this much."""
    repeat_penalty: float | None = None
    """llama.cpp's (as in ChatOllama): divides positive logits (multiplies negative ones) of the tokens among the
    reply's last ``repeat_last_n``."""
    repeat_last_n: int | None = None
    dry_multiplier: float | None = None
    """DRY ("don't repeat yourself", as in llama.cpp): penalises the token that would extend a repetition of at
    least ``dry_allowed_length`` tokens by ``dry_multiplier * dry_base ** (length - dry_allowed_length)``."""
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: list[str] | None = None
    timeout: float | None = None
    """Seconds a call may take; checked between decoded tokens, raising ``TimeoutError``."""
    max_retries: int = 0
    """Accepted for compatibility with other chat models; a local model has no transient failures to retry."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _session_id: str = PrivateAttr(default_factory=lambda: f"chat-sirllm-{uuid.uuid4().hex}")
    _shared_engine: Engine | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="before")
    @classmethod
    def _gather_cache_settings(cls, values: Any) -> Any:
        """``ChatSirLLM(cache_size=..., decay=...)``: the cache settings become one ``SessionConfig``."""
        return SessionConfig.gather(values)

    @property
    def _llm_type(self) -> str:
        return "sirllm-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            **{name: getattr(self, name) for name in REPETITION_OPTIONS if getattr(self, name) is not None},
            **self.config.to_json(),
        }

    @property
    def model_name(self) -> str:
        """The loaded model's name (without loading it)."""
        if self.engine is not None:
            return self.engine.model.name
        return self.model or DEFAULT_MODEL_NAME

    @property
    def session(self) -> Session:
        """This model's own conversation session, for calls that name none (created, and the model loaded, on first
        use)."""
        return self._engine().route([], self._session_id, config=self.config)

    def _engine(self) -> Engine:
        if self.engine is not None:
            return self.engine
        with self._lock:
            if self._shared_engine is None:
                self._shared_engine = Engine.shared(self.model, backend=self.backend, threads=self.threads)
            return self._shared_engine

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="sirllm",
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop := stop or self.stop:
            params["ls_stop"] = stop
        return params

    # -- tools and structured output -----------------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | bool | dict | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools to the model.

        Args:
            tools: Tools as LangChain tools, functions, Pydantic models, TypedDicts or OpenAI tool dicts.
            tool_choice: ``"auto"``/``None`` (the model decides), ``"none"`` (no call is read), ``"any"``/
                ``"required"``/``True`` (exactly one call, to any tool) or a tool name (exactly one call to that
                tool). Required calls are grammar-constrained, so even a small model writes a valid call.
            strict: Accepted for compatibility; required calls are always held to the tools' schemas.
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        return super().bind(tools=formatted, tool_choice=normalize_tool_choice(tool_choice, formatted), **kwargs)

    def with_structured_output(
        self,
        schema: dict | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """A runnable whose output follows ``schema`` (a Pydantic class, a TypedDict or a JSON schema dict).

        Args:
            method: ``"json_schema"`` decodes JSON constrained to the schema; ``"function_calling"`` makes a
                constrained call to a tool with the schema as its parameters; ``"json_mode"`` decodes any JSON object
                (describe the keys in the prompt).
            include_raw: Return ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}`` instead of raising when
                the reply does not parse.

        The value is closed within ``max_tokens`` (strings shortened, missing required keys at their smallest) when
        it can be; a reply that ``max_tokens`` still cut off raises ``OutputParserException`` (or is the
        ``parsing_error`` with ``include_raw``), never a partial object.
            strict: Accepted for compatibility; decoding is always held to the schema.
        """
        if kwargs:
            raise ValueError(f"unexpected arguments: {sorted(kwargs)}")
        if schema is None and method != "json_mode":
            raise ValueError(f"with_structured_output(method={method!r}) needs a schema")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools(
                [schema],
                tool_choice=name,
                one_off=True,
                ls_structured_output_format={"kwargs": {"method": method}, "schema": tool},
            )
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            json_schema = convert_to_json_schema(schema) if schema is not None else None
            response_format = (
                {"type": "json_schema", "schema": json_schema} if method == "json_schema" else {"type": "json_object"}
            )
            llm = self.bind(
                response_format=response_format,
                one_off=True,
                ls_structured_output_format={"kwargs": {"method": method}, "schema": json_schema},
            )
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}")
        parser = RunnableLambda(_whole_value) | parser
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        keep_error = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([keep_error], exception_key="parsing_error")

    # -- which conversation a call belongs to --------------------------------------------------------------------
    # BaseChatModel hands _generate/_stream the call's arguments but not its run config, so the entry points read
    # the session id from the config and pass it on as the call argument ``session_id``.

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return super().invoke(input, config, stop=stop, **_with_session_id(config, kwargs))

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return await super().ainvoke(input, config, stop=stop, **_with_session_id(config, kwargs))

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        return super().stream(input, config, stop=stop, **_with_session_id(config, kwargs))

    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        return super().astream(input, config, stop=stop, **_with_session_id(config, kwargs))

    # -- generation ----------------------------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, None, **kwargs))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        session_id, chat, options = self._convert(messages, stop, kwargs)
        stream = self._engine().stream(chat, session_id, config=self.config, **options)
        deadline = _Deadline(self.timeout)
        try:
            for event in stream:
                deadline.check()
                chunk = _chunk(event)
                if run_manager and chunk.text:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            stream.close()  # rolls an unfinished reply back; a no-op once it is complete
        yield self._last_chunk(stream.reply, stream.session)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, None, **kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """Decoded on a thread of the core's (the event loop stays free); leaving early rolls the reply back."""
        session_id, chat, options = self._convert(messages, stop, kwargs)
        stream = self._engine().astream(chat, session_id, config=self.config, **options)
        deadline = _Deadline(self.timeout)
        try:
            async for event in stream:
                deadline.check()
                chunk = _chunk(event)
                if run_manager and chunk.text:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await stream.aclose()
        yield self._last_chunk(stream.reply, stream.session)

    def _convert(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[str | None, list[dict], dict[str, Any]]:
        """The session id (None: the session the messages continue, for a one-off call), the messages as
        OpenAI-style dicts, and the core's call options."""
        kwargs = dict(kwargs)
        kwargs.pop("stream", None)
        kwargs.pop("model", None)
        one_off = bool(kwargs.pop("one_off", False))
        session_id = kwargs.pop("session_id", None)
        if session_id is None and not one_off:
            session_id = self._session_id
        options = {core: kwargs.pop(name, getattr(self, name)) for name, core in GENERATION_OPTIONS.items()}
        options["stop"] = stop if stop is not None else self.stop
        options["one_off"] = one_off
        for name in ("tools", "tool_choice", "response_format"):
            options[name] = kwargs.pop(name, None)
        if kwargs:
            raise TypeError(f"ChatSirLLM got unexpected call arguments: {sorted(kwargs)}")
        return session_id, [_to_chat_message(m, i) for i, m in enumerate(messages)], options

    def _last_chunk(self, reply: Reply, session: Session) -> ChatGenerationChunk:
        stats = reply.stats
        usage = UsageMetadata(
            input_tokens=stats.input_tokens,
            output_tokens=stats.generated_tokens,
            total_tokens=stats.input_tokens + stats.generated_tokens,
            input_token_details=InputTokenDetails(cache_read=stats.reused_tokens),
        )
        metadata = {
            "model_name": self.model_name,
            "model_provider": "sirllm",
            "finish_reason": reply.finish_reason,
            "closed_at_limit": reply.closed_at_limit,
            "prefilled_tokens": stats.prefilled_tokens,
            "evicted_tokens": stats.evicted_tokens,
            "cache_len": stats.cache_len,
            "cache_size": session.cache_size,
            "session_id": session.session_id,
            "restarts": stats.restarts,
            "prefill_seconds": stats.prefill_seconds,
            "decode_seconds": stats.decode_seconds,
        }
        message = AIMessageChunk(content="", usage_metadata=usage, response_metadata=metadata, chunk_position="last")
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": reply.finish_reason})


def _whole_value(message: AIMessage) -> AIMessage:
    """The message, unless ``max_tokens`` cut its value off: a partial object is an error, not a result."""
    if message.response_metadata.get("finish_reason") == "length":
        raise OutputParserException(
            "the structured reply was cut off by max_tokens before its value was complete (raise max_tokens); "
            f"reply so far: {message.content!r}",
            llm_output=message.content if isinstance(message.content, str) else None,
        )
    return message


class _Deadline:
    def __init__(self, timeout: float | None):
        self.timeout, self.start = timeout, time.monotonic()

    def check(self) -> None:
        if self.timeout is not None and time.monotonic() - self.start > self.timeout:
            raise TimeoutError(f"ChatSirLLM: the reply took longer than timeout={self.timeout} s")


def _chunk(event: TextDelta | ToolCallDelta) -> ChatGenerationChunk:
    if isinstance(event, TextDelta):
        return ChatGenerationChunk(message=AIMessageChunk(content=event.text))
    call = tool_call_chunk(name=event.name, args=event.arguments, id=event.id, index=event.index)
    return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[call]))


def _with_session_id(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Call arguments with ``session_id`` taken from the run config's ``configurable`` (the config passed, else the
    one of the enclosing runnable, as in a LangGraph node) unless the call names one itself."""
    if "session_id" not in kwargs:
        configurable = ensure_config(config).get("configurable") or {}
        found = next((configurable[key] for key in SESSION_ID_KEYS if configurable.get(key) is not None), None)
        if found is None:
            return kwargs
        kwargs = {**kwargs, "session_id": found}
    session_id = kwargs["session_id"]
    if isinstance(session_id, (int, uuid.UUID)) and not isinstance(session_id, bool):
        kwargs["session_id"] = str(session_id)
    elif session_id is not None and not (isinstance(session_id, str) and session_id):
        raise ValueError(
            f"a session id (configurable session_id / thread_id) must be a non-empty string, got {session_id!r}"
        )
    return kwargs


def _to_chat_message(message: BaseMessage, index: int) -> dict[str, Any]:
    """A LangChain message as the OpenAI-style dict the session takes."""
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": _text(message, index)}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": _text(message, index)}
    if isinstance(message, AIMessage):
        converted: dict[str, Any] = {"role": "assistant", "content": _text(message, index)}
        if message.tool_calls:
            converted["tool_calls"] = [
                {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["args"]}}
                for call in message.tool_calls
            ]
        return converted
    if isinstance(message, ToolMessage):
        converted = {"role": "tool", "content": _text(message, index), "tool_call_id": message.tool_call_id}
        if message.name:
            converted["name"] = message.name
        return converted
    if isinstance(message, ChatMessage):
        role = {"human": "user", "ai": "assistant"}.get(message.role, message.role)
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{index}]: unsupported chat message role {message.role!r}")
        return {"role": role, "content": _text(message, index)}
    raise ValueError(f"messages[{index}]: unsupported message type {type(message).__name__}")


def _text(message: BaseMessage, index: int) -> str:
    """The message's text: a string, or its text blocks joined; tool-call blocks are skipped (``tool_calls`` carry
    them); images, audio and files are refused."""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") not in _SKIPPED_BLOCKS:
            raise ValueError(
                f"messages[{index}]: {_TEXT_ONLY} and cannot take {block.get('type')!r} content blocks; "
                "send text (a string or text blocks)"
            )
    return "".join(parts)


__all__ = ["ChatSirLLM"]
