"""LangChain integration of sirllm-agents: ``ChatSirLLM``, a local chat model whose KV cache lives across an agent's
steps."""

from langchain_sirllm.chat_models import ChatSirLLM

__all__ = ["ChatSirLLM"]
