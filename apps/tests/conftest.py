"""The applications tests' fixtures, from the module shared with the library's tests (``tests/sirllm_fixtures.py``)."""

from sirllm_fixtures import converse, tiny_engine, tiny_model_dir, tokenizer  # noqa: F401
