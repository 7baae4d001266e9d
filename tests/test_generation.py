"""Reply text assembly (whole characters, stop strings cut and never shown) and the one home of decoding options."""

from __future__ import annotations

import pytest

from sirllm_agents.generation import GenerationConfig, ReplyText

TEXT = "Grüße aus Köln 🙂🚀 — 東京 ok"


def test_pieces_are_whole_characters_and_join_to_the_text(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT.split())  # multi-byte characters are split over several byte tokens
    text = ReplyText(tokenizer, stop=[])
    pieces = [text.push(i) for i in ids] + [text.finish()]
    assert "".join(pieces) == TEXT == text.text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop", ["Köln", "🚀", " ok", "東"])
def test_stop_string_is_cut_and_no_part_of_it_is_shown(tokenizer, stop):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    text = ReplyText(tokenizer, stop=["never", stop])
    pieces = []
    for i in ids:
        pieces.append(text.push(i))
        if text.stopped:
            break
    pieces.append(text.finish())
    assert text.stopped
    assert text.text == TEXT[: TEXT.index(stop)] == "".join(pieces)


def test_decoding_options_come_from_one_home(tiny_engine):
    base = GenerationConfig(max_new_tokens=9, temperature=0.5)
    config = GenerationConfig.of(base, temperature=None, top_k=3, stop="\n")
    assert (config.max_new_tokens, config.temperature, config.top_k, config.stop) == (9, 0.5, 3, ["\n"])
    assert GenerationConfig.of(max_new_tokens=None) == GenerationConfig()
    with pytest.raises(ValueError, match=r"unknown decoding options \['max_tokens'\]"):
        GenerationConfig.of(max_tokens=5)
    session = tiny_engine.session(cache_size=64)
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="max_tokens"):
        session.chat(messages, max_tokens=5)
    assert len(session) == 0 and not session.transcript.messages  # refused before anything was prefilled
    reply = session.chat(messages, generation=GenerationConfig(max_new_tokens=3), temperature=None)
    assert len(reply.token_ids) <= 3
