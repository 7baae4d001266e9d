"""One embedded SmolLM2-135M-Instruct engine for the whole test run, shared by every SirLLM."""

from __future__ import annotations

import pytest
from llama_index.llms.sirllm import SirLLM

from sirllm_agents import Engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine()


@pytest.fixture
def llm(engine: Engine) -> SirLLM:
    """A fresh chat session on the shared engine; greedy, short replies to keep the tests fast."""
    return SirLLM(engine=engine, max_new_tokens=6, cache_size=512)
