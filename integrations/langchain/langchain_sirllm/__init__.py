"""LangChain integration of sirllm-agents: ``ChatSirLLM``, a local chat model whose KV cache lives across an agent's
steps."""

from langchain_sirllm.chat_models import ChatSirLLM, shared_engine

__all__ = ["ChatSirLLM", "shared_engine"]
