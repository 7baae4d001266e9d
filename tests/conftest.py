"""The library tests' fixtures, from the module shared with the applications' tests; here the tiny engine runs on
each backend in turn, so every test that takes it holds for both."""

import pytest
from sirllm_fixtures import (  # noqa: F401
    BACKENDS,
    converse,
    embedded_engine,
    make_engine,
    make_tiny_llama,
    tiny_gguf,
    tiny_llama,
    tiny_weights,
    tokenizer,
)

from sirllm_agents import Engine


@pytest.fixture(scope="session", params=BACKENDS)
def tiny_engine(request, tokenizer, tiny_gguf) -> Engine:  # noqa: F811 (fixtures are arguments)
    return make_engine(request.param, tokenizer, tiny_gguf)


@pytest.fixture(scope="session")
def tiny_torch_engine(tokenizer) -> Engine:  # noqa: F811
    """For what only the PyTorch backend does (keys and values as tensors, devices, dtypes)."""
    return Engine(tiny_llama(tokenizer), tokenizer=tokenizer)
