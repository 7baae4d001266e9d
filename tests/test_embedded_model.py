"""The embedded SmolLM2-135M-Instruct: loads offline, and the session stays exact on a real model."""

from __future__ import annotations

import torch

CONVERSATION = [
    "My locker code is 4821. Please remember it.",
    "What is the capital of France?",
    "What is my locker code?",
]


def test_embedded_model_loads_offline_with_its_chat_template(embedded_engine):
    assert embedded_engine.model.name == "SmolLM2-135M-Instruct"
    assert embedded_engine.model.backend.config.model_type == "llama"
    assert embedded_engine.model.tokenizer.convert_ids_to_tokens(sorted(embedded_engine.model.stop_token_ids)) == [
        "<|im_end|>"
    ]
    assert "<|im_start|>" in embedded_engine.model.template.render([{"role": "user", "content": "x"}], True)


def test_replies_equal_generate_and_each_turn_prefills_only_new_tokens(embedded_engine):
    engine = embedded_engine
    session = engine.session(cache_size=1024)
    messages = []
    for text in CONVERSATION:
        messages.append({"role": "user", "content": text})
        prompt = engine.model.encode(engine.model.template.render(messages, add_generation_prompt=True))
        reply = session.chat(messages, max_new_tokens=20)
        with torch.no_grad():
            expected = engine.model.backend.weights.generate(
                torch.tensor([prompt]),
                max_new_tokens=20,
                do_sample=False,
                eos_token_id=sorted(engine.model.stop_token_ids),
            )[0, len(prompt) :].tolist()
        assert reply.token_ids == [t for t in expected if t not in engine.model.stop_token_ids]
        assert reply.stats.prefilled_tokens == len(prompt) - reply.stats.reused_tokens
        messages.append({"role": "assistant", "content": reply.text})
        assert session.cache.token_ids.tolist() == engine.model.encode(engine.model.template.render(messages, False))
    assert session.stats.restarts == 0 and session.stats.evicted_tokens == 0
