"""LangChain's standard integration tests, run against ChatSirLLM() on the embedded SmolLM2-135M-Instruct.

The suite runs once per backend (``ChatSirLLM()`` takes llama.cpp when llama-cpp-python is installed, else PyTorch),
each on one engine loaded once."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_sirllm import ChatSirLLM
from langchain_tests.integration_tests import ChatModelIntegrationTests

from sirllm_agents import Engine

pytestmark = pytest.mark.slow

AUTO_TOOL_CHOICE = (
    "the 135M model does not choose to call a tool under tool_choice='auto' (benchmarks/tool_choice.py, llama.cpp "
    "backend): over 12 requests a bound tool answers, this test's among them, its greedy reply is a call 0 times "
    "(95% interval [0, 0.24]); it gives '<tool_call>' a median probability of 0.0006 as its reply's start, against "
    "0.000003 where no tool is needed but 0.11 right after a tool's result, where 7 of 12 greedy replies call again, "
    "so no threshold on that probability calls when it should without looping; calls it makes when one is required "
    "are grammar-constrained and pass in test_tool_calling / test_tool_choice"
)


@functools.cache
def engine(backend: str) -> Engine:
    """The embedded model on ``backend``, loaded once for the suite."""
    if backend == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: scripts/setup.sh builds it (a failed build is logged in .venv)")
    return Engine(backend=backend)


LLAMACPP_JSON_MODE = (
    "on the llama.cpp backend the 135M model, asked for a joke as a JSON object with no schema, closes the object "
    "after 'setup' (valid JSON; the test also wants 'punchline')"
)


class ChatSirLLMStandard(ChatModelIntegrationTests):
    """The standard suite on the embedded model; each subclass names its backend."""

    backend: str

    @property
    def chat_model_class(self) -> type[ChatSirLLM]:
        return ChatSirLLM

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"max_tokens": 64, "cache_size": 1024, "engine": engine(self.backend)}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one ChatSirLLM holds one loaded model and its KV cache

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """A second turn of one conversation: the first turn's tokens are read from the KV cache."""
        llm = ChatSirLLM(engine=engine(self.backend), max_tokens=8)
        first = llm.invoke("Hello")
        messages = [HumanMessage("Hello"), first, HumanMessage("Say that again.")]
        if not stream:
            return llm.invoke(messages)
        full = None
        for chunk in llm.stream(messages):
            full = chunk if full is None else full + chunk
        return full

    @pytest.mark.xfail(reason=AUTO_TOOL_CHOICE, strict=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)


class TestChatSirLLMStandardLlamaCpp(ChatSirLLMStandard):
    backend = "llamacpp"

    # Q4_1 arithmetic changes the 135M model's greedy choice here.
    @pytest.mark.xfail(reason=LLAMACPP_JSON_MODE, strict=True)
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)


class TestChatSirLLMStandardTorch(ChatSirLLMStandard):
    backend = "torch"
