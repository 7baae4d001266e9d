"""Reply text assembly: whole characters only, stop strings cut and never shown."""

from __future__ import annotations

import pytest

from sirllm_agents.generation import ReplyText

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
