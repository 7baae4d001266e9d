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
    "the 135M model does not choose to call a tool under tool_choice='auto' (calls it makes when one is required "
    "are grammar-constrained and pass in test_tool_calling / test_tool_choice)"
)

REPEATS_IN_STRINGS = (
    "with the pydantic.v1 Joke schema in its prompt, the greedy 135M model repeats 'a cat is a cat,' inside the "
    "setup string until max_tokens cuts the JSON off (the grammar keeps it valid JSON, but it cannot make it end)"
)

# ChatSirLLM() runs the embedded model on llama.cpp when llama-cpp-python is installed (Engine's backend "auto"); its
# Q4_1 arithmetic changes the 135M model's greedy choices on two joke prompts. SIRLLM_TEST_BACKEND=torch (or
# llamacpp) runs the whole suite on that backend instead.
BACKEND = os.environ.get("SIRLLM_TEST_BACKEND", "auto")
ON_LLAMACPP = BACKEND == "llamacpp" or (BACKEND == "auto" and importlib.util.find_spec("llama_cpp") is not None)


@functools.cache
def engine() -> Engine:
    """The engine every ChatSirLLM of the suite runs on: ChatSirLLM()'s own shared one unless a backend is named."""
    return Engine.shared() if BACKEND == "auto" else Engine(backend=BACKEND)


LLAMACPP_REPEATS = (
    "on the llama.cpp backend the greedy 135M model repeats \"I'm a cat,\" inside the Joke's setup string until "
    "max_tokens cuts the JSON off (the grammar keeps it valid JSON, but it cannot make it end); the typeddict and "
    "json_schema forms pass (XPASS), hence not strict"
)
LLAMACPP_UNICODE_CALL = (
    "on the llama.cpp backend the greedy 135M model, made to call unicode_customer, writes the right customer_name "
    "('你好啊集团') and then repeats itself inside the description string until max_tokens (64) cuts the call off, so "
    "the reply has finish_reason 'length' and no tool call; on the PyTorch backend it closes the call and passes"
)
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

    @pytest.mark.xfail(reason=REPEATS_IN_STRINGS, strict=True)
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @pytest.mark.xfail(ON_LLAMACPP, reason=LLAMACPP_REPEATS, strict=False)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model: BaseChatModel, schema_type: str) -> None:
        super().test_structured_output(model, schema_type)

    @pytest.mark.xfail(ON_LLAMACPP, reason=LLAMACPP_REPEATS, strict=False)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model: BaseChatModel, schema_type: str) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(ON_LLAMACPP, reason=LLAMACPP_JSON_MODE, strict=True)
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(ON_LLAMACPP, reason=LLAMACPP_UNICODE_CALL, strict=True)
    def test_unicode_tool_call_integration(self, model: BaseChatModel, **options: Any) -> None:
        super().test_unicode_tool_call_integration(model, **options)
