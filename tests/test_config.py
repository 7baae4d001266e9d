"""SessionConfig: the one home of the cache settings, checked where it is made."""

from __future__ import annotations

import pytest

from sirllm_agents import SessionConfig
from sirllm_agents.policies import SirLLMPolicy, StreamingPolicy


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"policy": "lru"}, "unknown policy 'lru'"),
        ({"start_size": -1}, "start_size must be a non-negative integer"),
        ({"recent_size": 2.5}, "recent_size must be a non-negative integer"),
        ({"decay": 1.5}, r"decay must be in \[0, 1\]"),
        ({"prefill_chunk": 0}, "prefill_chunk must be a positive integer"),
        ({"cache_size": 20, "start_size": 4, "recent_size": 8}, "cache_size must be at least .* = 28, got 20"),
        ({"cache_size": 20}, "cache_size must be at least .* = 22, got 20"),  # the default window: 20 // 8
        ({"cache_size": "512"}, "cache_size must be an integer or None, got '512'"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        SessionConfig(**settings)


def test_sized_fills_the_default_and_refuses_a_size_past_the_model():
    assert SessionConfig().sized(8192).cache_size == 1024
    assert SessionConfig(policy="full").sized(8192).cache_size == 8192
    assert SessionConfig().sized(512).cache_size == 512
    with pytest.raises(ValueError, match="larger than the model's maximum length 2048"):
        SessionConfig(cache_size=4096).sized(2048)


def test_the_default_recent_window_is_an_eighth_of_the_cache_for_the_entropy_policies():
    assert SessionConfig().policy == "supersede"
    assert SessionConfig().sized(8192).recent_size == 128
    assert SessionConfig(cache_size=300, policy="sirllm").protected() == (4, 37)
    assert SessionConfig(cache_size=300, policy="streaming").sized(8192).recent_size == 0
    assert SessionConfig(policy="full").sized(2048).recent_size == 0
    assert SessionConfig(cache_size=300, recent_size=0).sized(8192).recent_size == 0  # asked for: kept
    # A policy object ranks; the settings own the window, by what the policy declares.
    assert SessionConfig(cache_size=300, policy=SirLLMPolicy()).sized(8192).recent_size == 37
    assert SessionConfig(cache_size=300, policy=StreamingPolicy(), recent_size=5).protected() == (4, 5)
    assert SessionConfig(cache_size=300, policy=StreamingPolicy()).protected() == (4, 0)
    assert SessionConfig(policy="full", start_size=4, recent_size=8).sized(2048).protected() == (0, 0)


def test_a_policy_that_is_not_a_policy_is_refused_by_name():
    class Ranker:  # ranks, but does not declare what it needs
        name = "ranker"

        def ranks(self, tokens):
            return tokens.scores

    with pytest.raises(ValueError, match=r"a built-in policy's name or a sirllm_agents\.policies\.Policy"):
        SessionConfig(policy=Ranker())


def test_of_and_gather_fold_loose_settings_into_one_config():
    base = SessionConfig(cache_size=256, decay=0.9)
    assert SessionConfig.of(base, decay=0.8) == SessionConfig(cache_size=256, decay=0.8)
    gathered = SessionConfig.gather({"config": base, "recent_size": 8, "temperature": 0.5})
    assert gathered == {"config": SessionConfig(cache_size=256, decay=0.9, recent_size=8), "temperature": 0.5}
    assert SessionConfig.gather({"temperature": 0.5}) == {"temperature": 0.5}
    with pytest.raises(ValueError, match="decay must be in"):
        SessionConfig.gather({"decay": 2.0})


def test_to_json_round_trips_and_refuses_a_policy_object():
    config = SessionConfig(cache_size=300, recent_size=16, policy="sentences")
    assert SessionConfig(**config.to_json()) == config
    with pytest.raises(ValueError, match="cannot be saved"):
        SessionConfig(policy=config.make_policy()).to_json()
