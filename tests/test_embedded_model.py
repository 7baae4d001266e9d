"""The embedded SmolLM2-135M-Instruct on each backend: loads offline, and the session stays exact on a real model."""

from __future__ import annotations

import torch

from sirllm_agents.loading import embedded_model_path

CONVERSATION = [
    "My locker code is 4821. Please remember it.",
    "What is the capital of France?",
    "What is my locker code?",
]


def test_embedded_model_loads_offline_with_its_chat_template(embedded_engine):
    assert embedded_engine.model.name == "SmolLM2-135M-Instruct"
    assert embedded_engine.model.identity["model_type"].startswith("llama")
    stop = embedded_engine.model.tokenizer.convert_ids_to_tokens(sorted(embedded_engine.model.stop_token_ids))
    # llama.cpp also ends generation at <|endoftext|>, which its vocabulary marks as an end of turn.
    assert stop == (
        ["<|endoftext|>", "<|im_end|>"] if embedded_engine.model.backend.name == "llamacpp" else ["<|im_end|>"]
    )
    assert "<|im_start|>" in embedded_engine.model.template.render([{"role": "user", "content": "x"}], True)


def test_replies_equal_generate_and_each_turn_prefills_only_new_tokens(embedded_engine):
    engine = embedded_engine
    session = engine.session(cache_size=1024)
    messages = []
    for text in CONVERSATION:
        messages.append({"role": "user", "content": text})
        prompt = engine.model.encode(engine.model.template.render(messages, add_generation_prompt=True))
        reply = session.chat(messages, max_new_tokens=20)
        assert reply.token_ids == reference_greedy(engine, prompt, 20)
        assert reply.stats.prefilled_tokens == len(prompt) - reply.stats.reused_tokens
        messages.append({"role": "assistant", "content": reply.text})
        assert session.cache.token_ids.tolist() == engine.model.encode(engine.model.template.render(messages, False))
    assert session.stats.restarts == 0 and session.stats.evicted_tokens == 0


def reference_greedy(engine, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The backend's own greedy decoding of ``prompt``, without a session: transformers' ``generate``, or
    llama-cpp-python's ``Llama.generate``."""
    stop = engine.model.stop_token_ids
    if engine.model.backend.name == "llamacpp":
        from llama_cpp import Llama

        tokens = []
        llm = Llama(str(embedded_model_path()), n_ctx=1024, verbose=False)
        for token in llm.generate(prompt, top_k=1, temp=0.0):
            if token in stop or len(tokens) == max_new_tokens:
                return tokens
            tokens.append(token)
    with torch.no_grad():
        out = engine.model.backend.weights.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stop)
        )
    return [t for t in out[0, len(prompt) :].tolist() if t not in stop]
