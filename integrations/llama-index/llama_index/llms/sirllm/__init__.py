"""LlamaIndex LLM integration for sirllm-agents: ``from llama_index.llms.sirllm import SirLLM``."""

from llama_index.llms.sirllm.base import UNBOUNDED_CONTEXT_WINDOW, SirLLM

__all__ = ["UNBOUNDED_CONTEXT_WINDOW", "SirLLM"]
