"""Shared fixtures of the langchain-sirllm tests: the repository's tiny random-weight engine for fast tests
(``tests/sirllm_fixtures.py``), and the embedded model (loaded once per test session through ``Engine.shared``)."""

from __future__ import annotations

import inspect

import pytest
from sirllm_fixtures import tiny_engine, tokenizer  # noqa: F401  (the repository's shared tiny Llama engine)

from sirllm_agents import Engine


@pytest.fixture(scope="session")
def embedded_engine() -> Engine:
    """The embedded SmolLM2-135M-Instruct, the same engine ``ChatSirLLM()`` uses."""
    return Engine.shared()


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Run the coroutine tests here (ours and langchain-tests') on pytest-asyncio: the repository's pytest does not
    use its auto mode, and marking whole modules would also mark the synchronous tests."""
    if inspect.iscoroutinefunction(obj) and not any(m.name == "asyncio" for m in getattr(obj, "pytestmark", [])):
        pytest.mark.asyncio(obj)
