"""Shared fixtures of the langchain-sirllm tests: a tiny random-weight engine for fast tests, and the embedded model
(loaded once per test session through ``Engine.shared``)."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sirllm_agents import Engine
from sirllm_agents.loading import embedded_tokenizer


@pytest.fixture(scope="session")
def tiny_engine() -> Engine:
    """A 2-layer random Llama over SmolLM2's tokenizer and chat template: fast, deterministic, and (under a grammar
    constraint) as valid as a real model."""
    tokenizer = embedded_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.3,
    )
    config._attn_implementation = "eager"
    return Engine(LlamaForCausalLM(config).eval(), tokenizer=tokenizer)


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
