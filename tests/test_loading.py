"""Model loading: clear one-line errors for what cannot be served."""

from __future__ import annotations

import json

import pytest
from transformers import GPT2Config, LlamaConfig

from sirllm_agents import Engine, ModelLoadError


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model path not found: .*nowhere"):
        Engine(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match=r"model path not found: .*missing\.gguf"):
        Engine(str(tmp_path / "missing.gguf"))


def test_unsupported_architecture_is_refused_before_loading_weights(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        Engine(tmp_path)


def test_unreadable_folder_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not"):
        Engine(tmp_path)


def test_tokenizer_without_chat_template_is_refused(tmp_path, tokenizer, make_tiny_llama):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no chat template"):
        Engine(tmp_path)
    # A local folder with a template loads, and serves a chat.
    engine = Engine(tmp_path, chat_template=tokenizer.chat_template)
    reply = engine.session().chat([{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert reply.stats.generated_tokens == 3


def test_saved_local_folder_loads_with_the_same_weights(tmp_path, tokenizer, make_tiny_llama):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    engine = Engine(tmp_path)
    assert isinstance(engine.model.backend.weights.config, LlamaConfig)
    messages = [{"role": "user", "content": "hi"}]
    expected = Engine(model, tokenizer=tokenizer).session().chat(messages, max_new_tokens=6).token_ids
    assert engine.session().chat(messages, max_new_tokens=6).token_ids == expected
