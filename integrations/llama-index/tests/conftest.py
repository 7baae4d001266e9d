"""One embedded SmolLM2-135M-Instruct engine for the whole test run, shared by every SirLLM."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core", reason="install the integration: pip install -e 'integrations/llama-index[test]'")

from sirllm_agents import Engine  # noqa: E402

from llama_index.llms.sirllm import SirLLM  # noqa: E402


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine()


@pytest.fixture
def llm(engine: Engine) -> SirLLM:
    """A fresh chat session on the shared engine; greedy, short replies to keep the tests fast."""
    return SirLLM(engine=engine, max_new_tokens=6, cache_size=512)
