"""LangChain's standard integration tests, run against ChatSirLLM() on the embedded SmolLM2-135M-Instruct.

Every ChatSirLLM() here shares the one process-wide engine (``Engine.shared``), so the model loads once."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_sirllm import ChatSirLLM
from langchain_tests.integration_tests import ChatModelIntegrationTests

from sirllm_agents import Engine

pytestmark = pytest.mark.slow

AUTO_TOOL_CHOICE = (
    "the 135M model does not choose to call a tool under tool_choice='auto': asked the weather in San Francisco with "
    "get_weather described in the system message, it gives '<tool_call>' a probability of 0.001 as its reply's start "
    "(llama.cpp backend, measured with Session.score) and answers in text (calls it makes when one is required are "
    "grammar-constrained and pass in test_tool_calling / test_tool_choice)"
)

# ChatSirLLM() runs the embedded model on llama.cpp when llama-cpp-python is installed (Engine's backend "auto"); its
# Q4_1 arithmetic changes the 135M model's greedy choice in JSON mode. SIRLLM_TEST_BACKEND=torch (or
# llamacpp) runs the whole suite on that backend instead.
BACKEND = os.environ.get("SIRLLM_TEST_BACKEND", "auto")
ON_LLAMACPP = BACKEND == "llamacpp" or (BACKEND == "auto" and importlib.util.find_spec("llama_cpp") is not None)


@functools.cache
def engine() -> Engine:
    """The engine every ChatSirLLM of the suite runs on: ChatSirLLM()'s own shared one unless a backend is named."""
    return Engine.shared() if BACKEND == "auto" else Engine(backend=BACKEND)


LLAMACPP_JSON_MODE = (
    "on the llama.cpp backend the 135M model, asked for a joke as a JSON object with no schema, closes the object "
    "after 'setup' (valid JSON; the test also wants 'punchline')"
)


class TestChatSirLLMStandard(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatSirLLM]:
        return ChatSirLLM

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"max_tokens": 64, "cache_size": 1024, "engine": engine()}

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
        llm = ChatSirLLM(engine=engine(), max_tokens=8)
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

    @pytest.mark.xfail(ON_LLAMACPP, reason=LLAMACPP_JSON_MODE, strict=True)
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)
