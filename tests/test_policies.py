"""The eviction policies beyond the paper's (words, sentences, density, supersede, structure), the token shapes they
group by, and the template marks the session records for them."""

from __future__ import annotations

import pytest
import torch

from sirllm_agents.policies import (
    CachedTokens,
    DensityPolicy,
    SentencesPolicy,
    SirLLMPolicy,
    StructurePolicy,
    SupersedePolicy,
    WordsPolicy,
)
from sirllm_agents.policies.sentences import sentence_index
from sirllm_agents.policies.supersede import restatements
from sirllm_agents.policies.words import word_surprisal
from sirllm_agents.token_shapes import TokenShapes


def cached(scores, template=None, word_start=None, sentence_end=None) -> CachedTokens:
    n = len(scores)

    def flags(values):
        return torch.zeros(n, dtype=torch.bool) if values is None else torch.tensor(values, dtype=torch.bool)

    ends = flags(sentence_end)
    return CachedTokens(
        torch.tensor(scores, dtype=torch.float32), flags(template), flags(word_start), ends, ends, torch.zeros(n).long()
    )


def cached_text(tokenizer, sentences: list[tuple[str, float]]) -> tuple[CachedTokens, list[range]]:
    """Message text as the cache holds it, every token of a sentence scored ``score``; and each sentence's tokens."""
    ids, scores, spans = [], [], []
    for text, score in sentences:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        spans.append(range(len(ids), len(ids) + len(piece)))
        ids += piece
        scores += [score] * len(piece)
    token_ids = torch.tensor(ids)
    shapes = TokenShapes.from_tokenizer(tokenizer).of(token_ids)
    template = torch.zeros(len(ids), dtype=torch.bool)
    return CachedTokens(torch.tensor(scores), template, *shapes, token_ids), spans


def test_token_shapes_mark_word_starts_and_sentence_ends(tokenizer):
    shapes = TokenShapes.from_tokenizer(tokenizer)
    text = "<|im_start|>user\nMy dog is Marigold. Really!\nOk<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    word_start, sentence_end, clause_end = shapes.of(torch.tensor(ids))
    flags = torch.zeros(len(ids), dtype=torch.bool)
    # Powers of two: each word's sum names exactly the tokens it holds.
    scores = 2.0 ** torch.arange(len(ids), dtype=torch.float64)
    words = word_surprisal(CachedTokens(scores, flags, word_start, sentence_end, clause_end, torch.tensor(ids)))
    grouped: dict[float, str] = {}
    for piece, word in zip(pieces, words.tolist()):
        grouped[word] = grouped.get(word, "") + piece
    assert {"<|im_start|>", "user", "\n", "My", " Marigold", " Really", "Ok", "<|im_end|>"} <= set(grouped.values())
    ends = [piece for piece, end in zip(pieces, sentence_end.tolist()) if end]
    assert "." in ends and "\n" in ends and any(p.endswith("!") or p == "!" for p in ends)
    assert shapes.word_start.numel() >= len(tokenizer)
    clause_ends = [piece for piece, end in zip(pieces, clause_end.tolist()) if end]
    assert set(ends) <= set(clause_ends) and not (clause_end & ~sentence_end).any()
    ids = tokenizer("Well, the code: 12; done", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p.strip() for p, end in zip(pieces, shapes.of(torch.tensor(ids))[2].tolist()) if end] == [",", ":", ";"]
    assert TokenShapes.from_tokenizer(tokenizer, len(tokenizer) + 7).word_start.numel() == len(tokenizer) + 7


def test_word_surprisal_is_the_sum_over_the_word():
    tokens = cached([1.0, 2.0, 3.0, 0.5, 4.0], word_start=[1, 0, 0, 1, 1])
    assert word_surprisal(tokens).tolist() == [6.0, 6.0, 6.0, 0.5, 4.0]


def test_words_policy_keeps_a_word_whole_where_sirllm_keeps_its_first_token():
    # Sinks 0-1; a name in three tokens (5, 0.1, 0.1) against single tokens of 3 and 2.9.
    tokens = cached([9, 9, 5, 0.1, 0.1, 3, 2.9, 1], word_start=[1, 1, 1, 0, 0, 1, 1, 1])
    assert SirLLMPolicy().keep(tokens, 5, 2, 0).tolist() == [0, 1, 2, 5, 6]
    assert WordsPolicy().keep(tokens, 5, 2, 0).tolist() == [0, 1, 2, 3, 4]


def test_sentences_policy_keeps_whole_sentences_and_evicts_template_tokens_first():
    # sink | template x2 | "a b c." (top word 6) | template | "d e." (top word 4) | recent
    scores = [9, 20, 20, 1, 6, 0.5, 30, 4, 0.2, 1]
    template = [0, 1, 1, 0, 0, 0, 1, 0, 0, 0]
    ends = [0, 0, 0, 0, 0, 1, 0, 0, 1, 0]
    tokens = cached(scores, template=template, word_start=[1] * 10, sentence_end=ends)
    policy = SentencesPolicy()
    assert policy.keep(tokens, 5, 1, 1).tolist() == [0, 3, 4, 5, 9]  # the first sentence whole, no template token
    assert policy.keep(tokens, 7, 1, 1).tolist() == [0, 3, 4, 5, 7, 8, 9]
    # With room for everything but two tokens, the template tokens of lowest entropy are the ones to go.
    assert policy.keep(tokens, 8, 1, 1).tolist() == [0, 3, 4, 5, 6, 7, 8, 9]


def test_density_policy_keeps_the_short_surprising_sentence_where_sentences_keeps_the_long_line_with_one_peak():
    # sink | "a b c." every word 3 nats | a long line, one word of 9 nats then seven of 0.1-0.7 | recent
    scores = [9, 3, 3, 3, 9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1]
    ends = [1, 0, 0, 1, *[0] * 7, 1, 0]
    tokens = cached(scores, word_start=[1] * 13, sentence_end=ends)
    # Mean 3 plus a tenth of 3 (3.3) against mean 1.5 plus a tenth of 9 (2.4): the short sentence, whole.
    assert DensityPolicy().keep(tokens, 5, 1, 1).tolist() == [0, 1, 2, 3, 12]
    assert SentencesPolicy().keep(tokens, 5, 1, 1).tolist() == [0, 4, 10, 11, 12]
    # With room for both, both stay whole; template tokens would go first as under `sentences`.
    assert DensityPolicy().keep(tokens, 13, 1, 1).tolist() == list(range(13))


def test_restatements_pair_a_restated_subject_not_a_repeated_preamble(tokenizer):
    tokens, _ = cached_text(
        tokenizer,
        [
            ("Please remember this: my locker code is 4821.", 1),
            (" Please remember this: my dentist appointment is on May 3.", 1),
            (" What is the capital of France?", 1),
            (" What is the capital of Japan?", 1),
            (" Update: my locker code is 5173 now, not the old one.", 1),
            (" What is the capital of Japan?", 1),
        ],
    )
    assert sentence_index(tokens)[-1] == 5  # one sentence each
    # The same question asked again restates nothing; the preamble repeated whole neither.
    assert restatements(tokens, sentence_index(tokens)) == [(2, 3), (0, 4)]


def test_supersede_policy_keeps_the_restatement_where_density_keeps_the_stale_value(tokenizer):
    # A restatement is predictable (its subject was said before), so its tokens score low.
    tokens, (stated, other, update) = cached_text(
        tokenizer,
        [
            ("Please remember this: my locker code is 4821.", 3.0),
            (" The capital of Peru is Lima.", 2.0),
            (" Update: my locker code is 5173 now, not the old one.", 1.0),
        ],
    )
    budget = len(other) + len(update)
    kept = set(DensityPolicy().keep(tokens, budget, 0, 0).tolist())
    assert set(stated) <= kept and set(other) <= kept and not set(update) <= kept
    kept = SupersedePolicy().keep(tokens, budget, 0, 0).tolist()
    assert kept == [*other, *update]
    # With room for all but a few tokens, the stale statement is what goes.
    kept = set(SupersedePolicy().keep(tokens, len(tokens) - 3, 0, 0).tolist())
    assert set(other) | set(update) <= kept and len(set(stated) - kept) == 3


def test_supersede_policy_evicts_the_stale_value_from_a_session(converse, tiny_engine):
    session = tiny_engine.session(cache_size=96, policy="supersede", recent_size=8)
    turns = ["Please remember this: my locker code is 4821.", *[f"The job {1000 + 37 * i} is done." for i in range(4)]]
    turns += ["Update: my locker code is 5173 now.", *[f"The job {2000 + 37 * i} is done." for i in range(8)]]
    converse(session, turns, max_new_tokens=4)
    assert len(session) <= 96 and session.stats.evicted_tokens > 0
    # Of the first message (the template's system prompt and the stale statement) only the attention sinks stay.
    begin, end = session.transcript.spans[0]
    assert set(session.cache.positions.tolist()) & set(range(begin, end)) == {0, 1, 2, 3}


def test_structure_policy_keeps_template_tokens_while_they_fit():
    tokens = cached([9, 0.1, 0.2, 5, 6, 0.3, 1], template=[0, 1, 1, 0, 0, 1, 0])
    assert StructurePolicy().keep(tokens, 5, 1, 1).tolist() == [0, 1, 2, 5, 6]
    assert StructurePolicy().keep(tokens, 4, 1, 1).tolist() == [0, 2, 5, 6]


@pytest.mark.parametrize("policy", ["words", "sentences", "density", "supersede", "structure"])
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
