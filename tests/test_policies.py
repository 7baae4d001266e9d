"""The eviction policies beyond the paper's (words, sentences, density, structure), the token shapes they group by,
and the template marks the session records for them."""

from __future__ import annotations

import pytest
import torch

from sirllm_agents.policies import (
    CachedTokens,
    DensityPolicy,
    SentencesPolicy,
    SirLLMPolicy,
    StructurePolicy,
    WordsPolicy,
)
from sirllm_agents.policies.words import word_surprisal
from sirllm_agents.token_shapes import TokenShapes


def cached(scores, template=None, word_start=None, sentence_end=None) -> CachedTokens:
    n = len(scores)

    def flags(values):
        return torch.zeros(n, dtype=torch.bool) if values is None else torch.tensor(values, dtype=torch.bool)

    return CachedTokens(
        torch.tensor(scores, dtype=torch.float32), flags(template), flags(word_start), flags(sentence_end)
    )


def test_token_shapes_mark_word_starts_and_sentence_ends(tokenizer):
    shapes = TokenShapes.from_tokenizer(tokenizer)
    text = "<|im_start|>user\nMy dog is Marigold. Really!\nOk<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    word_start, sentence_end = shapes.of(torch.tensor(ids))
    flags = torch.zeros(len(ids), dtype=torch.bool)
    # Powers of two: each word's sum names exactly the tokens it holds.
    scores = 2.0 ** torch.arange(len(ids), dtype=torch.float64)
    words = word_surprisal(CachedTokens(scores, flags, word_start, sentence_end))
    grouped: dict[float, str] = {}
    for piece, word in zip(pieces, words.tolist()):
        grouped[word] = grouped.get(word, "") + piece
    assert {"<|im_start|>", "user", "\n", "My", " Marigold", " Really", "Ok", "<|im_end|>"} <= set(grouped.values())
    ends = [piece for piece, end in zip(pieces, sentence_end.tolist()) if end]
    assert "." in ends and "\n" in ends and any(p.endswith("!") or p == "!" for p in ends)
    assert shapes.word_start.numel() >= len(tokenizer)
    assert TokenShapes.from_tokenizer(tokenizer, len(tokenizer) + 7).word_start.numel() == len(tokenizer) + 7


def test_word_surprisal_is_the_sum_over_the_word():
    tokens = cached([1.0, 2.0, 3.0, 0.5, 4.0], word_start=[1, 0, 0, 1, 1])
    assert word_surprisal(tokens).tolist() == [6.0, 6.0, 6.0, 0.5, 4.0]


def test_words_policy_keeps_a_word_whole_where_sirllm_keeps_its_first_token():
    # Sinks 0-1; a name in three tokens (5, 0.1, 0.1) against single tokens of 3 and 2.9.
    tokens = cached([9, 9, 5, 0.1, 0.1, 3, 2.9, 1], word_start=[1, 1, 1, 0, 0, 1, 1, 1])
    assert SirLLMPolicy(start_size=2).keep(tokens, 5).tolist() == [0, 1, 2, 5, 6]
    assert WordsPolicy(start_size=2).keep(tokens, 5).tolist() == [0, 1, 2, 3, 4]


def test_sentences_policy_keeps_whole_sentences_and_evicts_template_tokens_first():
    # sink | template x2 | "a b c." (top word 6) | template | "d e." (top word 4) | recent
    scores = [9, 20, 20, 1, 6, 0.5, 30, 4, 0.2, 1]
    template = [0, 1, 1, 0, 0, 0, 1, 0, 0, 0]
    ends = [0, 0, 0, 0, 0, 1, 0, 0, 1, 0]
    tokens = cached(scores, template=template, word_start=[1] * 10, sentence_end=ends)
    policy = SentencesPolicy(start_size=1, recent_size=1)
    assert policy.keep(tokens, 5).tolist() == [0, 3, 4, 5, 9]  # the first sentence whole, no template token
    assert policy.keep(tokens, 7).tolist() == [0, 3, 4, 5, 7, 8, 9]
    # With room for everything but two tokens, the template tokens of lowest entropy are the ones to go.
    assert policy.keep(tokens, 8).tolist() == [0, 3, 4, 5, 6, 7, 8, 9]


def test_density_policy_keeps_the_short_surprising_sentence_where_sentences_keeps_the_long_line_with_one_peak():
    # sink | "a b c." every word 3 nats | a long line, one word of 9 nats then seven of 0.1-0.7 | recent
    scores = [9, 3, 3, 3, 9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1]
    ends = [1, 0, 0, 1, *[0] * 7, 1, 0]
    tokens = cached(scores, word_start=[1] * 13, sentence_end=ends)
    # Mean 3 plus a tenth of 3 (3.3) against mean 1.5 plus a tenth of 9 (2.4): the short sentence, whole.
    assert DensityPolicy(start_size=1, recent_size=1).keep(tokens, 5).tolist() == [0, 1, 2, 3, 12]
    assert SentencesPolicy(start_size=1, recent_size=1).keep(tokens, 5).tolist() == [0, 4, 10, 11, 12]
    # With room for both, both stay whole; template tokens would go first as under `sentences`.
    assert DensityPolicy(start_size=1, recent_size=1).keep(tokens, 13).tolist() == list(range(13))


def test_structure_policy_keeps_template_tokens_while_they_fit():
    tokens = cached([9, 0.1, 0.2, 5, 6, 0.3, 1], template=[0, 1, 1, 0, 0, 1, 0])
    assert StructurePolicy(start_size=1, recent_size=1).keep(tokens, 5).tolist() == [0, 1, 2, 5, 6]
    assert StructurePolicy(start_size=1, recent_size=1).keep(tokens, 4).tolist() == [0, 2, 5, 6]


@pytest.mark.parametrize("policy", ["words", "sentences", "density", "structure"])
def test_each_policy_holds_the_bound_over_a_long_conversation(converse, tiny_engine, policy):
    session = tiny_engine.session(cache_size=96, policy=policy, recent_size=8)
    converse(session, [f"Turn {i}: my code is {1000 + 37 * i}. Please keep it." for i in range(14)])
    assert len(session) <= 96 and session.stats.evicted_tokens > 0
    assert session.cache.positions[:4].tolist() == [0, 1, 2, 3]


def test_template_marks_cover_exactly_what_the_template_wrote(tiny_engine):
    messages = [{"role": "user", "content": "My dog is Rex."}, {"role": "assistant", "content": "Noted, Rex."}]
    text = tiny_engine.model.template.render(messages, add_generation_prompt=False)
    ids, marks = tiny_engine.model.encode_marked(text, [m["content"] for m in messages])
    assert ids == tiny_engine.model.encode(text)
    content = tiny_engine.model.tokenizer.decode([i for i, m in zip(ids, marks) if not m])
    assert content == "My dog is Rex.Noted, Rex."
    template = tiny_engine.model.tokenizer.decode([i for i, m in zip(ids, marks) if m])
    assert template == text.replace("My dog is Rex.", "").replace("Noted, Rex.", "")
    # A content the template does not write verbatim marks nothing.
    assert not any(tiny_engine.model.encode_marked(text, ["not in the text"])[1])


def test_the_session_records_template_marks_for_prompts_replies_and_ingested_messages(tiny_engine):
    session = tiny_engine.session(policy="full")
    messages = [{"role": "user", "content": "My dog is Rex."}, {"role": "assistant", "content": "Noted."}]
    session.ingest(messages)
    messages.append({"role": "user", "content": "Name?"})
    reply = session.chat(messages, max_new_tokens=6)
    cache = session.cache
    assert cache.template.numel() == len(cache)
    text = tiny_engine.model.tokenizer.decode(cache.token_ids[~cache.template].tolist())
    assert text == "My dog is Rex.Noted.Name?" + reply.text
