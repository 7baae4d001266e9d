"""LangChain's standard unit tests for ChatSirLLM (no model is loaded)."""

from __future__ import annotations

from typing import Any

from langchain_sirllm import ChatSirLLM
from langchain_tests.unit_tests import ChatModelUnitTests


class TestChatSirLLMUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatSirLLM]:
        return ChatSirLLM

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"cache_size": 512, "decay": 0.9}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        params = super().standard_chat_model_params
        params.pop("api_key")  # a local model takes no API key
        return params

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one ChatSirLLM holds one loaded model and its KV cache
