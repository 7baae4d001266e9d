"""Repetition penalties on hand-made logits: each one's exact effect, DRY's matches, and validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sirllm_agents.generation import GenerationConfig
from sirllm_agents.penalties import CONSTRAINED_PENALTIES, NO_PENALTIES, Penalties, RepetitionPenalty

VOCAB = 8
TEXTS = {0: "a", 1: " cat", 2: " is", 3: ",", 4: '"', 5: "\n", 6: " dog", 7: "."}


def penalize(penalties: Penalties, tokens: list[int], logits: torch.Tensor | None = None) -> torch.Tensor:
    penalty = RepetitionPenalty(penalties, TEXTS.__getitem__)
    for token in tokens:
        penalty.accept(token)
    return penalty(logits if logits is not None else torch.linspace(-3.0, 4.0, VOCAB))


def test_frequency_and_presence_lower_a_token_seen_k_times_by_exactly_k_f_plus_p():
    base = torch.linspace(-3.0, 4.0, VOCAB)
    tokens = [1, 2, 1, 3, 1, 2]  # 1 three times, 2 twice, 3 once
    out = penalize(Penalties(frequency_penalty=0.5, presence_penalty=0.25), tokens, base)
    expected = base.clone()
    for token, k in {1: 3, 2: 2, 3: 1}.items():
        expected[token] = base[token] - k * 0.5 - 0.25
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_negative_frequency_and_presence_raise_seen_tokens():
    base = torch.zeros(VOCAB)
    out = penalize(Penalties(frequency_penalty=-1.0, presence_penalty=-0.5), [4, 4], base)
    assert out[4].item() == 2.5 and torch.count_nonzero(out).item() == 1


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits_in_the_window_only():
    base = torch.tensor([2.0, -2.0, 3.0, -1.0, 0.5, 1.0, 1.0, 1.0])
    # Window of the last 3 tokens: 0, 1, 3 (token 2 is older); token 0 twice counts once.
    out = penalize(Penalties(repeat_penalty=2.0, repeat_last_n=3), [2, 0, 1, 0, 3], base)
    assert out.tolist() == [1.0, -4.0, 3.0, -2.0, 0.5, 1.0, 1.0, 1.0]


def test_repeat_last_n_minus_one_is_the_whole_reply_and_zero_turns_it_off():
    base = torch.full((VOCAB,), 2.0)
    whole = penalize(Penalties(repeat_penalty=4.0, repeat_last_n=-1), [6, 1, 2], base)
    assert whole.tolist() == [2.0, 0.5, 0.5, 2.0, 2.0, 2.0, 0.5, 2.0]
    assert penalize(Penalties(repeat_penalty=4.0, repeat_last_n=0), [6, 1, 2], base) is base


def test_dry_penalises_the_token_that_would_extend_a_repetition_by_multiplier_times_base_power():
    # "a cat is a cat is a cat" -> the next " is" would repeat " cat is a cat" again.
    tokens = [0, 1, 2, 0, 1, 2, 0, 1]
    penalty = RepetitionPenalty(Penalties(dry_multiplier=0.5, dry_base=2.0, dry_allowed_length=2), TEXTS.__getitem__)
    for token in tokens:
        penalty.accept(token)
    # The suffix "a cat is a cat" (5 tokens) occurred followed by " is"; nothing else follows a matching suffix.
    assert penalty.dry_matches() == {2: 5}
    base = torch.zeros(VOCAB)
    out = penalty(base)
    assert out[2].item() == -0.5 * 2.0 ** (5 - 2)
    assert torch.count_nonzero(out).item() == 1


def test_dry_leaves_matches_shorter_than_the_allowed_length_alone():
    tokens = [1, 2, 6, 1]  # " cat" once before, followed by " is": a match of length 1
    out = penalize(Penalties(dry_multiplier=1.0, dry_allowed_length=2), tokens, torch.zeros(VOCAB))
    assert torch.count_nonzero(out).item() == 0
    out = penalize(Penalties(dry_multiplier=1.0, dry_allowed_length=1, dry_base=3.0), tokens, torch.zeros(VOCAB))
    assert out[2].item() == -1.0 and torch.count_nonzero(out).item() == 1


def test_a_dry_match_stops_at_a_sequence_breaker():
    # '"' breaks sequences: the repeated ' cat is' before it does not count, only what follows the newest quote.
    tokens = [1, 2, 4, 1, 2, 4, 1]
    penalty = RepetitionPenalty(Penalties(dry_multiplier=1.0, dry_allowed_length=1), TEXTS.__getitem__)
    for token in tokens:
        penalty.accept(token)
    assert penalty.dry_matches() == {2: 1}
    unbroken = RepetitionPenalty(
        Penalties(dry_multiplier=1.0, dry_allowed_length=1, dry_sequence_breakers=["\n"]), TEXTS.__getitem__
    )
    for token in tokens:
        unbroken.accept(token)
    assert unbroken.dry_matches() == {2: 4}


def test_dry_penalty_last_n_limits_the_search():
    tokens = [0, 1, 2, 6, 6, 6, 0, 1]  # "a cat" earlier followed by " is", outside a window of 4
    assert RepetitionPenalty(Penalties(dry_multiplier=1.0), TEXTS.__getitem__).dry_matches() == {}
    wide = RepetitionPenalty(Penalties(dry_multiplier=1.0, dry_penalty_last_n=-1), TEXTS.__getitem__)
    narrow = RepetitionPenalty(Penalties(dry_multiplier=1.0, dry_penalty_last_n=4), TEXTS.__getitem__)
    for token in tokens:
        wide.accept(token)
        narrow.accept(token)
    assert wide.dry_matches() == {2: 2}
    assert narrow.dry_matches() == {}


def test_no_penalties_return_the_very_logits_given():
    base = torch.randn(VOCAB)
    assert penalize(NO_PENALTIES, [1, 1, 1, 2], base) is base
    assert penalize(CONSTRAINED_PENALTIES, [], base) is base


def test_penalties_keep_masked_tokens_masked():
    base = torch.tensor([float("-inf"), 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    out = penalize(Penalties(frequency_penalty=1.0, repeat_penalty=1.5, dry_multiplier=1.0), [0, 1, 0, 1, 0], base)
    assert out[0].item() == float("-inf")


def test_the_config_takes_the_default_of_the_reply_kind_and_overrides_it_field_by_field():
    config = GenerationConfig()
    assert config.penalties(constrained=False) == NO_PENALTIES
    assert config.penalties(constrained=True) == CONSTRAINED_PENALTIES
    config = GenerationConfig(presence_penalty=0.5, dry_multiplier=0.0)
    assert config.penalties(constrained=True) == dataclasses.replace(
        CONSTRAINED_PENALTIES, presence_penalty=0.5, dry_multiplier=0.0
    )
    assert config.penalties(constrained=False) == Penalties(presence_penalty=0.5)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty must be between -2 and 2"),
        ({"presence_penalty": -3}, "presence_penalty must be between -2 and 2"),
        ({"repeat_penalty": 0}, "repeat_penalty must be > 0"),
        ({"repeat_last_n": -2}, "repeat_last_n must be an integer >= -1"),
        ({"dry_multiplier": -0.1}, "dry_multiplier must be >= 0"),
        ({"dry_base": 0.5}, "dry_base must be >= 1"),
        ({"dry_allowed_length": 0}, "dry_allowed_length must be an integer >= 1"),
        ({"dry_penalty_last_n": 1.5}, "dry_penalty_last_n must be an integer >= -1"),
        ({"dry_sequence_breakers": "\n"}, "dry_sequence_breakers must be a list of non-empty strings"),
        ({"dry_sequence_breakers": ["\n", ""]}, "dry_sequence_breakers must be a list of non-empty strings"),
    ],
)
def test_bad_penalties_are_refused_naming_the_setting(options, named):
    with pytest.raises(ValueError, match=named):
        GenerationConfig(**options)


# -- in the decode loop -----------------------------------------------------------------------------------------

SAY = [{"role": "user", "content": "Say something."}]
REPEAT_MORE = {"repeat_penalty": 0.2, "repeat_last_n": -1}  # a penalty below 1 favours repeats: easy to see


def test_penalties_reach_the_decode_loop_and_neutral_ones_change_no_token(tiny_engine):
    plain = tiny_engine.session().chat(SAY, max_new_tokens=40)
    assert len(set(plain.token_ids)) == len(plain.token_ids) == 40  # the tiny model does not repeat itself
    neutral = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repeat_penalty": 1.0, "dry_multiplier": 0.0}
    assert tiny_engine.session().chat(SAY, max_new_tokens=40, **neutral).token_ids == plain.token_ids
    repeated = tiny_engine.session().chat(SAY, max_new_tokens=40, **REPEAT_MORE)
    assert repeated.token_ids[:1] == plain.token_ids[:1]  # nothing to penalise before the first token
    assert len(set(repeated.token_ids)) < 20


def test_bad_penalties_are_refused_before_anything_is_ingested(tiny_engine):
    session = tiny_engine.session()
    with pytest.raises(ValueError, match="dry_base must be >= 1"):
        session.chat(SAY, dry_base=0.5)
    assert session.transcript.messages == [] and len(session) == 0
