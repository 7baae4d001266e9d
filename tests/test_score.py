"""Session.score on a tiny random Llama: option log-likelihoods against one plain forward, the no-reply state it
leaves, the prefix it reuses, and the cache bound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from sirllm_fixtures import held_lengths, score_atol

from sirllm_agents.policies import CachedTokens, Policy

QUESTIONS = ["Hi there!", "What is 2+2?", "Name a colour.", "Tell me a short joke."]
OPTIONS = ["B", "Paris", "the capital of France, which is a rather long answer"]


def rendered_ids(engine, messages, add_generation_prompt: bool = False) -> list[int]:
    return engine.model.encode(engine.model.template.render(messages, add_generation_prompt=add_generation_prompt))


def plain_logprob(model, prompt: list[int], option: list[int]) -> float:
    """``log p(option | prompt)`` from one forward over prompt + option, no cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + option])).logits[0].double()
    logprobs = logits[len(prompt) - 1 : -1].log_softmax(-1)
    return float(logprobs.gather(-1, torch.tensor(option)[:, None]).sum())


def conversation(session, turns: list[str]) -> list[dict]:
    messages = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": session.chat(messages, max_new_tokens=6).text})
    return messages


def test_option_logprobs_equal_one_forward_over_prompt_and_option(tiny_engine, tiny_weights):
    session = tiny_engine.session(policy="full")
    messages = conversation(session, QUESTIONS[:2]) + [{"role": "user", "content": "What is the capital of France?"}]
    prompt = rendered_ids(tiny_engine, messages, add_generation_prompt=True)
    # SmolLM2's template writes an assistant message's content verbatim, so the option's tokens are its encoding.
    expected = [plain_logprob(tiny_weights, prompt, tiny_engine.model.encode(option)) for option in OPTIONS]

    scores = session.score(messages, OPTIONS)

    assert scores == pytest.approx(expected, abs=score_atol(tiny_engine) * 4)  # a sum over the option's tokens
    assert all(s < 0 for s in scores)


def test_scoring_leaves_the_no_reply_state_and_the_next_call_prefills_only_the_new_messages(tiny_engine):
    session = tiny_engine.session(policy="full")
    messages = conversation(session, QUESTIONS[:2]) + [{"role": "user", "content": "Pick a letter: A or B?"}]
    turns_before = session.stats.turns

    session.score(messages, ["A", "B", "neither of them"])

    # Exactly the messages, no generation prompt, no option, and keys/values for every recorded token.
    assert session.cache.token_ids.tolist() == rendered_ids(tiny_engine, messages)
    assert session.transcript.messages == messages
    assert held_lengths(session.cache.runner) == {len(session.cache)}
    assert session.stats.turns == turns_before  # no reply was recorded

    # The same as a session whose stream on these messages was abandoned.
    other = tiny_engine.session(policy="full")
    conversation(other, QUESTIONS[:2])
    stream = other.stream(messages, max_new_tokens=4)
    next(stream)
    stream.close()
    assert torch.equal(session.cache.token_ids, other.cache.token_ids)
    assert torch.allclose(session.cache.scores, other.cache.scores, atol=1e-5)
    if tiny_engine.model.backend.name == "torch":  # llama.cpp's cells may sit in other slots after a rollback
        for mine, theirs in zip(session.cache.runner.kv.layers, other.cache.runner.kv.layers):
            assert torch.allclose(mine.keys, theirs.keys, atol=1e-5)

    # Appending the chosen answer and a new question prefills just those, and replies as a fresh session would.
    messages += [{"role": "assistant", "content": "B"}, {"role": "user", "content": "Why?"}]
    reply = session.chat(messages, max_new_tokens=8)
    assert reply.stats.restarts == 0
    assert reply.stats.reused_tokens == len(rendered_ids(tiny_engine, messages[:-2]))
    assert reply.stats.prefilled_tokens == reply.stats.input_tokens - reply.stats.reused_tokens
    assert reply.stats.input_tokens == len(rendered_ids(tiny_engine, messages, add_generation_prompt=True))
    fresh = tiny_engine.session(policy="full").chat(messages, max_new_tokens=8)
    assert reply.token_ids == fresh.token_ids


def test_scoring_twice_reuses_the_prefix_and_gives_the_same_scores(tiny_engine):
    session = tiny_engine.session(policy="full")
    messages = [{"role": "user", "content": "Which is a fruit? (A) apple (B) brick"}]
    first = session.score(messages, ["A", "B", "apple", "brick"])
    prefilled = session.stats.prefilled_tokens
    second = session.score(messages, ["A", "B", "apple", "brick"])
    assert second == pytest.approx(first, abs=1e-4)
    assert session.stats.restarts == 0
    # Only the generation prompt (and the last message token, re-fed for its logits) ran again.
    prompt_tokens = len(rendered_ids(tiny_engine, messages, True)) - len(rendered_ids(tiny_engine, messages))
    assert session.stats.prefilled_tokens - prefilled == prompt_tokens


def test_cache_bound_and_decay_hold_over_many_scored_turns(tiny_engine):
    cache_size, decay = 64, 0.5
    session = tiny_engine.session(cache_size=cache_size, decay=decay)
    messages = []
    options = ["A", "B", "a long option that needs several forward tokens to score"]
    for turn in range(12):
        messages.append({"role": "user", "content": f"Question {turn}: is {turn} even? (A) yes (B) no"})
        before = session.cache.scores.clone()
        kept_before = session.cache.positions.clone()
        scores = session.score(messages, options)
        assert len(scores) == 3 and all(s < 0 for s in scores)
        assert len(session.cache) <= cache_size
        assert held_lengths(session.cache.runner) == {len(session.cache)}
        # Tokens that were cached before this call and stayed were decayed exactly once.
        stayed = torch.isin(session.cache.positions, kept_before)
        old = torch.isin(kept_before, session.cache.positions)
        assert torch.allclose(session.cache.scores[stayed], before[old] * decay)
        messages.append({"role": "assistant", "content": "A" if scores[0] > scores[1] else "B"})
    assert session.stats.evicted_tokens > 0
    assert session.stats.restarts == 0


@dataclass
class NewestFirstOut(Policy):
    """A policy that evicts the newest tokens first, so scoring's make-room evicts the conversation's last token."""

    name: ClassVar[str] = "newest-first-out"
    scored: ClassVar[bool] = False  # so no recent window protects the newest

    def ranks(self, tokens: CachedTokens) -> torch.Tensor:
        return -torch.arange(len(tokens), dtype=torch.float32)


def test_the_history_stays_whole_when_eviction_took_the_last_token_before_a_rollback(tiny_engine):
    # SirLLM can evict a low-entropy last token (the newline after <|im_end|>). Scoring then rolls back, and the next
    # call feeds the newest cached token again for its logits; the history must still hold every token once.
    session = tiny_engine.session(cache_size=48, policy=NewestFirstOut())
    messages, gaps = [], 0
    for turn in range(6):
        messages.append({"role": "user", "content": f"Question {turn}: is {turn} even? (A) yes (B) no"})
        session.score(messages, ["A", "B", "an option long enough to push the end of the question out of the cache"])
        history = rendered_ids(tiny_engine, messages)
        assert session.cache.history_ids.tolist() == history
        assert len(session.cache) <= 48 and session.cache.positions.max() < len(history)
        gaps += int(session.cache.positions[-1]) < len(history) - 1  # the last token was evicted
        memory = session.memory()
        assert "".join(t.text for t in memory.conversation) == tiny_engine.model.template.render(messages, False)
        assert [t.position for t in memory.tokens] == session.cache.positions.tolist()
        messages.append({"role": "assistant", "content": "A"})
    assert gaps > 0


@pytest.mark.parametrize("options", [[], "AB", [""], ["A", 3]])
def test_bad_options_are_value_errors_that_change_nothing(tiny_engine, options):
    session = tiny_engine.session(policy="full")
    with pytest.raises(ValueError, match="options"):
        session.score([{"role": "user", "content": "hi"}], options)
    assert len(session.cache) == 0


def test_an_option_longer_than_the_cache_is_a_value_error_and_rolls_back(tiny_engine):
    session = tiny_engine.session(cache_size=32)
    messages = [{"role": "user", "content": "Say something long."}]
    with pytest.raises(ValueError, match="does not fit"):
        session.score(messages, ["short", "word " * 60])
    assert len(session.cache) <= 32
    assert session.transcript.messages == messages
    assert len(session.score(messages, ["short"])) == 1
