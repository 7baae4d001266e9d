"""SirLLM chat model: a local model whose KV cache lives across an agent's steps."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
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
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr

from sirllm_agents import SESSION_SETTINGS, Engine, Reply, ReplyStream, Session
from sirllm_agents.constrained import json_object_constraint, json_schema_constraint, tool_call_constraint
from sirllm_agents.generation import TokenConstraint
from sirllm_agents.tools import TOOL_CALL_START, prepare_tool_messages, split_tool_calls

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# An AIMessage whose content is not the model's reply text verbatim (tool calls were parsed out of it) keeps that
# text here, so that sending the message back lets the session recognise its own reply and reuse its KV cache.
REPLY_TEXT_KEY = "sirllm_reply_text"
REQUIRED_CHOICES = ("any", "required")
# Run-config keys that name the conversation a call belongs to, in order of precedence.
SESSION_ID_KEYS = ("session_id", "thread_id")
_TEXT_ONLY = "ChatSirLLM runs a text-only model"
_SKIPPED_BLOCKS = ("tool_use", "tool_call", "tool_call_chunk", "function_call", "reasoning", "thinking")

_engines: dict[str | None, Engine] = {}
_engines_lock = threading.Lock()


def shared_engine(model: str | None = None) -> Engine:
    """The process-wide :class:`~sirllm_agents.Engine` for ``model`` (``None``: the embedded model), loaded once."""
    with _engines_lock:
        if model not in _engines:
            _engines[model] = Engine(model)
        return _engines[model]


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

        A call that names none runs on this instance's own session; ``bind_tools`` and ``with_structured_output``
        share it. Calls on one session are serialized.
    """

    model: str | None = None
    """Model to load: a local folder, a Hugging Face hub id, or a ``.gguf`` file. ``None``: the embedded
    SmolLM2-135M-Instruct. Ignored when ``engine`` is given."""
    engine: Engine | None = Field(default=None, exclude=True)
    """An already loaded engine to share between wrappers. Without one, engines are shared per ``model``."""
    temperature: float = 0.0
    """Sampling temperature; 0 decodes greedily."""
    max_tokens: int = 256
    """Most tokens to generate per reply."""
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    """Seed for sampling when ``temperature > 0``, for repeatable replies."""
    stop: list[str] | None = None
    """Stop strings: the reply ends before the first one, which is not included."""
    timeout: float | None = None
    """Seconds a call may take; checked between decoded tokens, raising ``TimeoutError``."""
    max_retries: int = 0
    """Accepted for compatibility with other chat models; a local model has no transient failures to retry."""
    cache_size: int | None = None
    """Most tokens the KV cache holds (default: 1024, or the model's length for ``policy="full"``)."""
    start_size: int = 4
    """Attention-sink tokens at the start that are never evicted."""
    recent_size: int = 0
    """Newest tokens that are never evicted."""
    decay: float = 1.0
    """Factor applied to every cached token's score after each turn, so old key tokens can fade."""
    policy: Literal["sirllm", "streaming", "full"] = "sirllm"
    """Who stays when the cache is full: highest token entropy (``sirllm``), newest (``streaming``), or nobody is
    evicted (``full``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _session: Session | None = PrivateAttr(default=None)
    _session_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

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
            "cache_size": self.cache_size,
            "start_size": self.start_size,
            "recent_size": self.recent_size,
            "decay": self.decay,
            "policy": self.policy,
        }

    @property
    def model_name(self) -> str:
        """The loaded model's name (without loading it)."""
        if self.engine is not None:
            return self.engine.model_name
        return self.model or DEFAULT_MODEL_NAME

    @property
    def session(self) -> Session:
        """This model's own conversation session, for calls that name none (created, and the model loaded, on first
        use)."""
        with self._session_lock:
            if self._session is None:
                self._session = self._engine().session(**self._session_options())
            return self._session

    def _engine(self) -> Engine:
        return self.engine if self.engine is not None else shared_engine(self.model)

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
            tool_choice: ``"auto"``/``None`` (the model decides), ``"none"`` (no call is parsed), ``"any"``/
                ``"required"``/``True`` (exactly one call, to any tool) or a tool name (exactly one call to that
                tool). Required calls are grammar-constrained, so even a small model writes a valid call.
            strict: Accepted for compatibility; required calls are always held to the tools' schemas.
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        choice = _normalize_tool_choice(tool_choice, [t["function"]["name"] for t in formatted])
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

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
                the reply does not parse (for example, when ``max_tokens`` cut it off).
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
                [schema], tool_choice=name, ls_structured_output_format={"kwargs": {"method": method}, "schema": tool}
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
                ls_structured_output_format={"kwargs": {"method": method}, "schema": json_schema},
            )
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}")
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

    def _session_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SESSION_SETTINGS}

    # -- generation ----------------------------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._chunks(self._plan(messages, stop, kwargs)))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(self._plan(messages, stop, kwargs)):
            if run_manager and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

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
        """Decode on a worker thread (one per call, so the event loop stays free); calls on the session queue up on
        its lock. Leaving the iteration early stops the decoding and rolls the partial reply back."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[ChatGenerationChunk | None, BaseException | None]] = asyncio.Queue()
        abandoned = threading.Event()

        def post(item: tuple[ChatGenerationChunk | None, BaseException | None]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                abandoned.set()

        def produce() -> None:
            try:
                for chunk in self._chunks(self._plan(messages, stop, kwargs), abandoned):
                    post((chunk, None))
            except BaseException as error:  # handed to the awaiting side, which re-raises it
                post((None, error))
            else:
                post((None, None))

        threading.Thread(target=produce, name="sirllm-astream", daemon=True).start()
        try:
            while True:
                chunk, error = await queue.get()
                if error is not None:
                    raise error
                if chunk is None:
                    return
                if run_manager and chunk.text:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            abandoned.set()

    def _plan(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _Plan:
        """Turn LangChain messages and call options into what the session needs."""
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None) or None
        choice = _normalize_tool_choice(kwargs.pop("tool_choice", None), [t["function"]["name"] for t in tools or []])
        response_format = kwargs.pop("response_format", None)
        kwargs.pop("stream", None)
        options = {
            "max_new_tokens": kwargs.pop("max_tokens", self.max_tokens),
            "temperature": kwargs.pop("temperature", self.temperature),
            "top_p": kwargs.pop("top_p", self.top_p),
            "top_k": kwargs.pop("top_k", self.top_k),
            "seed": kwargs.pop("seed", self.seed),
            "stop": stop if stop is not None else self.stop,
        }
        kwargs.pop("model", None)
        session_id = kwargs.pop("session_id", None)
        if kwargs:
            raise TypeError(f"ChatSirLLM got unexpected call arguments: {sorted(kwargs)}")
        engine = self._engine()
        chat = [_to_chat_message(m, i) for i, m in enumerate(messages)]
        if response_format is not None:
            chat = _with_format_instructions(chat, response_format)
        chat, template_tools = prepare_tool_messages(engine, chat, tools)
        constraint: TokenConstraint | None = None
        if response_format is not None:
            schema = _response_schema(response_format)
            if schema is not None:
                constraint = json_schema_constraint(engine, schema)
            else:
                constraint = json_object_constraint(engine)
        elif tools and choice not in (None, "auto", "none"):
            constraint = tool_call_constraint(engine, tools, choice)
        parse_tools = bool(tools) and choice != "none"
        if not parse_tools:
            mode = "pass"
        else:
            mode = "hold" if constraint is not None else "auto"
        return _Plan(session_id, chat, template_tools, tools or [], parse_tools, constraint, options, mode)

    def _open(self, plan: _Plan) -> ReplyStream:
        """The reply stream of a call: on the engine's pooled session ``plan.session_id``, else on our own."""
        generation = {"tools": plan.template_tools, "constraint": plan.constraint, **plan.options}
        if plan.session_id is None:
            return self.session.stream(plan.messages, **generation)
        return self._engine().stream(
            plan.messages, plan.session_id, session_options=self._session_options(), **generation
        )

    def _chunks(self, plan: _Plan, abandoned: threading.Event | None = None) -> Iterator[ChatGenerationChunk]:
        """Run one call: text chunks as they are decoded, then a last chunk with the tool calls and usage."""
        stream = self._open(plan)
        shown = _Shown(plan.mode)
        start = time.monotonic()
        try:
            for piece in stream:
                if abandoned is not None and abandoned.is_set():
                    return
                if self.timeout is not None and time.monotonic() - start > self.timeout:
                    raise TimeoutError(f"ChatSirLLM: the reply took longer than timeout={self.timeout} s")
                if text := shown.push(piece):
                    yield ChatGenerationChunk(message=AIMessageChunk(content=text))
        finally:
            stream.close()  # rolls an unfinished reply back; a no-op once it is complete
        assert stream.reply is not None and stream.session is not None
        yield self._last_chunk(stream.reply, stream.session, plan, shown.text)

    def _last_chunk(self, reply: Reply, session: Session, plan: _Plan, shown: str) -> ChatGenerationChunk:
        content, calls = split_tool_calls(reply.text, plan.tools) if plan.parse_tools else (reply.text, [])
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
            "finish_reason": "tool_calls" if calls else reply.finish_reason,
            "prefilled_tokens": stats.prefilled_tokens,
            "evicted_tokens": stats.evicted_tokens,
            "cache_len": stats.cache_len,
            "cache_size": session.cache_size,
            "session_id": session.session_id,
            "restarts": stats.restarts,
            "prefill_seconds": stats.prefill_seconds,
            "decode_seconds": stats.decode_seconds,
        }
        message = AIMessageChunk(
            content=content[len(shown) :] if content.startswith(shown) else "",
            tool_call_chunks=[
                tool_call_chunk(name=c.name, args=json.dumps(c.arguments, ensure_ascii=False), id=c.id, index=i)
                for i, c in enumerate(calls)
            ],
            additional_kwargs={REPLY_TEXT_KEY: reply.text} if content != reply.text else {},
            usage_metadata=usage,
            response_metadata=metadata,
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": metadata["finish_reason"]})


@dataclass
class _Plan:
    session_id: str | None  # the engine's pooled session to run on; None: the model's own session
    messages: list[dict]
    template_tools: list[dict] | None  # tools the chat template renders (None: they are in the system message)
    tools: list[dict]
    parse_tools: bool
    constraint: TokenConstraint | None
    options: dict[str, Any]
    mode: Literal["pass", "auto", "hold"]  # how text is streamed while the reply may still be a tool call


@dataclass
class _Shown:
    """Decides how much of the reply may be streamed as content while it may still turn out to be a tool call.

    ``pass``: everything; ``hold``: nothing (a required call). ``auto``: text up to where a call could begin, never
    leading or trailing whitespace, and nothing of a reply that opens like a JSON call; so what was shown is always
    the start of the final content, whichever way the reply turns out."""

    mode: Literal["pass", "auto", "hold"]
    text: str = ""
    _reply: str = field(default="", repr=False)
    _held: bool = False

    def push(self, piece: str) -> str:
        self._reply += piece
        if self.mode == "pass":
            end = len(self._reply)
        elif self.mode == "hold" or self._held:
            return ""
        else:
            reply = self._reply
            if reply[:1].isspace() or reply[:1] in ("{", "[", "`"):
                self._held = True
                return ""
            end = reply.find(TOOL_CALL_START)
            if end >= 0:
                self._held = True
            else:
                end = len(reply) - _partial_suffix(reply, TOOL_CALL_START)
            end = len(reply[:end].rstrip())
        new = self._reply[len(self.text) : end] if end > len(self.text) else ""
        self.text += new
        return new


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


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


def _normalize_tool_choice(choice: str | bool | dict | None, names: list[str]) -> str | None:
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name") or choice.get("name") or choice.get("type")
    if choice is True:
        choice = "any"
    if choice in (None, False, "auto", "none", *REQUIRED_CHOICES):
        return None if choice is False else choice
    if isinstance(choice, str) and choice in names:
        return choice
    raise ValueError(
        f"tool_choice must be 'auto', 'none', 'any', 'required' or one of the tool names {names}, got {choice!r}"
    )


def _to_chat_message(message: BaseMessage, index: int) -> dict[str, Any]:
    """A LangChain message as the OpenAI-style dict the session takes."""
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": _text(message, index)}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": _text(message, index)}
    if isinstance(message, AIMessage):
        return _assistant_message(message, index)
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


def _assistant_message(message: AIMessage, index: int) -> dict[str, Any]:
    content = _text(message, index)
    if not message.tool_calls:
        return {"role": "assistant", "content": content}
    # Our own reply, unchanged since: send the text the model wrote, which the session holds in its cache.
    reply = message.additional_kwargs.get(REPLY_TEXT_KEY)
    if isinstance(reply, str):
        names = [{"name": call["name"]} for call in message.tool_calls]
        text, calls = split_tool_calls(reply, _unique(names))
        if text == content and [(c.name, c.arguments) for c in calls] == [
            (call["name"], call["args"]) for call in message.tool_calls
        ]:
            return {"role": "assistant", "content": reply}
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["args"]}}
            for call in message.tool_calls
        ],
    }


def _unique(tools: list[dict]) -> list[dict]:
    return list({t["name"]: t for t in tools}.values())


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


def _response_schema(response_format: dict) -> dict | None:
    """The JSON schema of ``{"type": "json_schema", "schema": ...}`` (or OpenAI's ``"json_schema": {"schema": ...}``);
    ``None`` for ``{"type": "json_object"}``."""
    if response_format.get("type") != "json_schema":
        return None
    return response_format.get("schema") or (response_format.get("json_schema") or {}).get("schema")


def _with_format_instructions(messages: list[dict], response_format: dict) -> list[dict]:
    """Tell the model the JSON it is held to (the grammar enforces the shape; the prompt gives it the meaning)."""
    schema = _response_schema(response_format)
    if schema is None:
        instruction = "Reply with a JSON object."
    else:
        instruction = "Reply with a JSON object that follows this JSON schema:\n" + json.dumps(schema, ensure_ascii=False)
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{instruction}".lstrip("\n")
    else:
        messages.insert(0, {"role": "system", "content": instruction})
    return messages


__all__ = ["ChatSirLLM", "shared_engine"]
