"""LangChain's standard integration tests, run against ChatSirLLM() on the embedded SmolLM2-135M-Instruct.

Every ChatSirLLM() here shares the one process-wide engine (``Engine.shared``), so the model loads once."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_sirllm import ChatSirLLM
from langchain_tests.integration_tests import ChatModelIntegrationTests

pytestmark = pytest.mark.slow

AUTO_TOOL_CHOICE = (
    "the 135M model does not choose to call a tool under tool_choice='auto' (calls it makes when one is required "
    "are grammar-constrained and pass in test_tool_calling / test_tool_choice)"
)

REPEATS_IN_STRINGS = (
    "with the pydantic.v1 Joke schema in its prompt, the greedy 135M model repeats 'a cat is a cat,' inside the "
    "setup string until max_tokens cuts the JSON off (the grammar keeps it valid JSON, but it cannot make it end)"
)


class TestChatSirLLMStandard(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatSirLLM]:
        return ChatSirLLM

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"max_tokens": 64, "cache_size": 1024}

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
        llm = ChatSirLLM(max_tokens=8)
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

    @pytest.mark.xfail(reason=REPEATS_IN_STRINGS, strict=True)
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        super().test_structured_output_pydantic_2_v1(model)
