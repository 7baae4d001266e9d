"""The embedded SmolLM2-135M-Instruct on each backend in turn (PyTorch, and llama.cpp when it is installed), loaded once
per test run and shared by every SirLLM of that backend."""

from __future__ import annotations

import pytest
from llama_index.llms.sirllm import SirLLM
from sirllm_fixtures import embedded_engine  # noqa: F401  (the embedded model on each backend)

from sirllm_agents import Engine


@pytest.fixture(scope="session")
def engine(embedded_engine: Engine) -> Engine:  # noqa: F811
    return embedded_engine


@pytest.fixture
def llm(engine: Engine) -> SirLLM:
    """A fresh chat session on the shared engine; greedy, short replies to keep the tests fast."""
    return SirLLM(engine=engine, max_new_tokens=6, cache_size=512)
