"""The library tests' fixtures, from the module shared with the applications' tests."""

from sirllm_fixtures import converse, embedded_engine, make_tiny_llama, tiny_engine, tiny_llama, tokenizer  # noqa: F401
