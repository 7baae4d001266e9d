"""The contract tests' drivers, one per adapter: the same neutral calls (OpenAI-style message dicts, Python functions
as tools) made through each framework's own types, and the answers read back into one shape; and the ``driver``
fixture that runs each test against both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_sirllm import ChatSirLLM
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.sirllm import SirLLM
from pydantic import BaseModel

from sirllm_agents import Engine, Reply, Session, SessionConfig


@dataclass
class Answer:
    """What an adapter's call gave back: the shown text, the calls as (name, arguments), the streamed text pieces
    (empty for a plain call), and the usage it reported."""

    content: str
    calls: list[tuple[str, dict]]
    call_ids: list[str]
    pieces: list[str]
    prompt_tokens: int
    cached_tokens: int


class Driver:
    """Calls through one adapter's chat model (``llm``), on its own session."""

    def __init__(self, engine: Engine, max_tokens: int, config: SessionConfig):
        self.engine, self.max_tokens, self.config = engine, max_tokens, config

    @property
    def session(self) -> Session:
        return self.llm.session

    def core_reply(self, messages: list[dict], **options: Any) -> Reply:
        """What the core replies to ``messages`` on a fresh session with the same settings: the reference."""
        return self.engine.session(self.config).chat(messages, max_new_tokens=self.max_tokens, **options)


class LangChainDriver(Driver):
    name = "langchain"

    def __init__(self, engine: Engine, max_tokens: int, config: SessionConfig):
        super().__init__(engine, max_tokens, config)
        self.llm = ChatSirLLM(engine=engine, max_tokens=max_tokens, config=config)

    def tool_specs(self, tools: list[Callable]) -> list[dict]:
        return [convert_to_openai_tool(tool) for tool in tools]

    def call(
        self, messages: list[dict], tools: list[Callable] = (), tool_choice: str | None = None, stream: bool = False
    ) -> Answer:
        llm = self.llm.bind_tools(list(tools), tool_choice=tool_choice) if tools else self.llm
        converted = [_to_langchain(m) for m in messages]
        if not stream:
            message = llm.invoke(converted)
            return _langchain_answer(message, [])
        chunks = list(llm.stream(converted))
        message = chunks[0]
        for chunk in chunks[1:]:
            message = message + chunk
        return _langchain_answer(message, [c.content for c in chunks if c.content])

    def structured(self, schema: type[BaseModel], question: str) -> BaseModel:
        return self.llm.with_structured_output(schema).invoke(question)


def _to_langchain(message: dict) -> BaseMessage:
    if message["role"] == "system":
        return SystemMessage(message["content"])
    if message["role"] == "user":
        return HumanMessage(message["content"])
    if message["role"] == "tool":
        return ToolMessage(message["content"], tool_call_id=message["tool_call_id"])
    calls = [
        {"name": c["function"]["name"], "args": c["function"]["arguments"], "id": c["id"]}
        for c in message.get("tool_calls", [])
    ]
    return AIMessage(message["content"], tool_calls=calls)


def _langchain_answer(message: AIMessage, pieces: list[str]) -> Answer:
    usage = message.usage_metadata
    return Answer(
        content=message.content,
        calls=[(c["name"], c["args"]) for c in message.tool_calls],
        call_ids=[c["id"] for c in message.tool_calls],
        pieces=pieces,
        prompt_tokens=usage["input_tokens"],
        cached_tokens=usage["input_token_details"]["cache_read"],
    )


class LlamaIndexDriver(Driver):
    name = "llama_index"

    def __init__(self, engine: Engine, max_tokens: int, config: SessionConfig):
        super().__init__(engine, max_tokens, config)
        self.llm = SirLLM(engine=engine, max_new_tokens=max_tokens, config=config)

    def tool_specs(self, tools: list[Callable]) -> list[dict]:
        return [FunctionTool.from_defaults(tool).metadata.to_openai_tool(skip_length_check=True) for tool in tools]

    def call(
        self, messages: list[dict], tools: list[Callable] = (), tool_choice: str | None = None, stream: bool = False
    ) -> Answer:
        converted = [_to_llama_index(m) for m in messages]
        if tools:
            specs = [FunctionTool.from_defaults(tool) for tool in tools]
            if stream:
                responses = list(
                    self.llm.stream_chat_with_tools(specs, chat_history=converted, tool_choice=tool_choice)
                )
            else:
                responses = [self.llm.chat_with_tools(specs, chat_history=converted, tool_choice=tool_choice)]
        else:
            responses = list(self.llm.stream_chat(converted)) if stream else [self.llm.chat(converted)]
        return _llama_index_answer(responses[-1], [r.delta for r in responses if r.delta] if stream else [])

    def structured(self, schema: type[BaseModel], question: str) -> BaseModel:
        return self.llm.structured_predict(schema, PromptTemplate("{question}"), question=question)


def _to_llama_index(message: dict) -> ChatMessage:
    extra: dict[str, Any] = {}
    if message.get("tool_calls"):
        extra["tool_calls"] = message["tool_calls"]
    if message["role"] == "tool":
        extra["tool_call_id"] = message["tool_call_id"]
    return ChatMessage(role=MessageRole(message["role"]), content=message["content"], additional_kwargs=extra)


def _llama_index_answer(response, pieces: list[str]) -> Answer:
    calls = response.message.additional_kwargs.get("tool_calls") or []
    usage = response.raw["usage"]
    return Answer(
        content=response.message.content or "",
        calls=[(c["function"]["name"], c["function"]["arguments"]) for c in calls],
        call_ids=[c["id"] for c in calls],
        pieces=pieces,
        prompt_tokens=usage["prompt_tokens"],
        cached_tokens=usage["cached_tokens"],
    )


CONFIG = SessionConfig(cache_size=512, start_size=4)
MAX_TOKENS = 40


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine.shared()


@pytest.fixture(params=[LangChainDriver, LlamaIndexDriver], ids=lambda driver: driver.name)
def driver(request, engine: Engine):
    """A fresh chat model of each adapter on the shared engine, greedy, with the contract's cache settings."""
    return request.param(engine, MAX_TOKENS, config=CONFIG)
