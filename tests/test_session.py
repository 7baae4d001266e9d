"""The session on a tiny random Llama: exactness against transformers, incremental prefill, scores, decay,
eviction bounds, restarts, rollback, and bad input."""

from __future__ import annotations

import pytest
import torch
from sirllm_fixtures import held_lengths, score_atol

from sirllm_agents import ContextOverflowError, Engine
from sirllm_agents.policies import CachedTokens, SirLLMPolicy

QUESTIONS = ["Hi there!", "What is 2+2?", "Name a colour.", "Tell me a short joke.", "Thanks, bye!"]


def rendered_ids(engine: Engine, messages, add_generation_prompt: bool = False) -> list[int]:
    return engine.model.encode(engine.model.template.render(messages, add_generation_prompt=add_generation_prompt))


def surprisal_of_sequence(model, ids: list[int]) -> torch.Tensor:
    """-log p(x_i | x_<i) for i >= 1 from one forward over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = logits[:-1].log_softmax(-1)
    return -logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_full_policy_matches_generate_and_prefills_only_new_tokens(tiny_engine, tiny_weights):
    session = tiny_engine.session(policy="full")
    messages = []
    for turn, text in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": text})
        prompt = rendered_ids(tiny_engine, messages, add_generation_prompt=True)
        reused_before = session.transcript.length
        reply = session.chat(messages, max_new_tokens=12)

        with torch.no_grad():
            expected = tiny_weights.generate(
                torch.tensor([prompt]),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=sorted(tiny_engine.model.stop_token_ids),
                pad_token_id=tiny_engine.model.tokenizer.eos_token_id,
            )[0, len(prompt) :].tolist()
        expected = [t for t in expected if t not in tiny_engine.model.stop_token_ids]
        assert reply.token_ids == expected, f"turn {turn}"
        assert reply.stats.input_tokens == len(prompt)
        assert reply.stats.reused_tokens == reused_before
        assert reply.stats.prefilled_tokens == len(prompt) - reused_before
        assert reply.stats.restarts == 0
        if turn:
            assert 0 < reply.stats.prefilled_tokens < len(prompt) / 2

        messages.append({"role": "assistant", "content": reply.text})
        # Nothing evicted: the cache holds exactly the rendering of the whole conversation.
        assert session.cache.token_ids.tolist() == rendered_ids(tiny_engine, messages)
        assert held_lengths(session.cache.runner) == {len(session)}
    assert session.stats.turns == len(QUESTIONS)
    assert session.stats.restarts == 0


def test_scores_are_token_surprisal_decayed_once_per_turn(converse, tiny_engine, tiny_weights):
    decay = 0.5
    session = tiny_engine.session(cache_size=2048, decay=decay)
    messages, _ = converse(session, QUESTIONS[:4])
    ids = session.cache.token_ids.tolist()
    assert ids == rendered_ids(tiny_engine, messages)

    raw = surprisal_of_sequence(tiny_weights, ids)
    atol = score_atol(tiny_engine)
    completed = session.stats.turns
    assert completed == 4
    expected = raw * decay ** (completed - session.cache.turns[1:]).float()
    torch.testing.assert_close(session.cache.scores[1:], expected, atol=atol, rtol=1e-4)
    # The very first token has nothing before it: it takes the highest score of its turn.
    first_turn = raw[session.cache.turns[1:] == 0]
    torch.testing.assert_close(session.cache.scores[0], first_turn.max() * decay**completed, atol=atol, rtol=1e-4)


def test_cache_bound_sinks_and_sirllm_kept_set_over_200_turns(converse, tiny_engine, monkeypatch):
    session = tiny_engine.session(cache_size=128, start_size=4, recent_size=8, decay=0.9, policy="sirllm")
    cache_cls = type(session.cache)
    evictions = []
    original_make_room, original_record = cache_cls.make_room, cache_cls._record

    def checked_make_room(cache, n, slack=0):
        scores, positions = cache.scores.clone(), cache.positions.clone()
        evicted = original_make_room(cache, n, slack)
        if evicted:
            kept = set(cache.positions.tolist())
            count = len(positions)
            budget = len(cache)
            middle = torch.arange(4, count - 8)
            top = middle[scores[4 : count - 8].topk(budget - 12).indices]
            expected = set(range(4)) | set(range(count - 8, count)) | set(top.tolist())
            assert kept == {int(positions[i]) for i in expected}
            evictions.append(evicted)
        return evicted

    def checked_record(cache, *args, **kwargs):
        original_record(cache, *args, **kwargs)
        assert len(cache) <= 128
        assert held_lengths(cache.runner) == {len(cache)}

    monkeypatch.setattr(cache_cls, "make_room", checked_make_room)
    monkeypatch.setattr(cache_cls, "_record", checked_record)
    turns = [f"Turn {i}: remember the number {i * 37 % 101}." for i in range(200)]
    converse(session, turns, max_new_tokens=6)
    assert session.stats.turns == 200 and session.stats.restarts == 0
    assert len(evictions) > 20
    assert session.cache.positions[:4].tolist() == [0, 1, 2, 3]
    assert len(session) <= 128


def test_policy_keeps_sinks_recent_and_top_scores():
    scores = torch.tensor([9.0, 9, 0, 5, 1, 7, 2, 0, 3, 0])
    flags = torch.zeros(10, dtype=torch.bool)
    tokens = CachedTokens(scores, flags, flags, flags, flags, torch.arange(10))
    kept = SirLLMPolicy().keep(tokens, 6, start_size=2, recent_size=2)
    assert kept.tolist() == [0, 1, 3, 5, 8, 9]


def test_retained_keys_equal_keys_computed_at_their_new_index(converse, tiny_torch_engine):
    """Layer 0 keys depend only on the token and its position, so after eviction and re-rotation they must equal
    the keys of the kept tokens computed afresh at cache indices 0..n-1."""
    session = tiny_torch_engine.session(cache_size=64, start_size=4)
    converse(session, QUESTIONS * 3, max_new_tokens=6)
    assert session.stats.evicted_tokens > 0
    ids = session.cache.token_ids.tolist()
    fresh = tiny_torch_engine.session(policy="full")
    with torch.no_grad():
        fresh.cache.ingest(ids, range(len(ids)), 0, [False] * len(ids))
    torch.testing.assert_close(
        session.cache.runner.kv.layers[0].keys, fresh.cache.runner.kv.layers[0].keys, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        session.cache.runner.kv.layers[0].values, fresh.cache.runner.kv.layers[0].values, atol=1e-6, rtol=1e-6
    )


def test_huge_input_is_ingested_in_chunks_within_the_bound(tiny_engine):
    session = tiny_engine.session(cache_size=128)
    tool_result = " ".join(f"row{i} value={i * 7919 % 1000}" for i in range(9000))
    messages = [
        {"role": "user", "content": "Summarize the table."},
        {"role": "assistant", "content": "Calling the tool."},
        {"role": "tool", "content": tool_result},
    ]
    reply = session.chat(messages, max_new_tokens=8)
    assert reply.stats.input_tokens > 50_000
    assert reply.stats.evicted_tokens > 50_000 - 128
    assert len(session) <= 128
    assert session.cache.positions[:4].tolist() == [0, 1, 2, 3]


def test_full_policy_overflow_is_a_clear_error_and_loses_nothing(tokenizer, make_tiny_llama):
    engine = Engine(make_tiny_llama(max_position_embeddings=96), tokenizer=tokenizer)
    session = engine.session(policy="full")
    messages = [{"role": "user", "content": "Hi"}]
    reply = session.chat(messages, max_new_tokens=4)
    before = session.cache.token_ids.clone()
    messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "word " * 80}]
    with pytest.raises(ContextOverflowError, match="policy 'full' never evicts"):
        session.chat(messages, max_new_tokens=4)
    assert torch.equal(session.cache.token_ids, before)
    assert session.transcript.messages == messages[:2]


def test_divergent_history_restarts_and_matches_a_fresh_session(converse, tiny_engine):
    session = tiny_engine.session(cache_size=256)
    messages, _ = converse(session, QUESTIONS[:3])
    edited = [dict(m) for m in messages]
    edited[2] = {"role": "user", "content": "What is 3+3?"}
    edited.append({"role": "user", "content": "And now?"})
    reply = session.chat(edited, max_new_tokens=10)
    fresh = tiny_engine.session(cache_size=256).chat(edited, max_new_tokens=10)
    assert reply.stats.restarts == 1 and session.stats.restarts == 1
    assert reply.token_ids == fresh.token_ids
    assert reply.stats.reused_tokens == 0
    assert session.cache.token_ids.tolist() == rendered_ids(
        tiny_engine, edited + [{"role": "assistant", "content": reply.text}]
    )


def test_dropping_the_last_reply_restarts(tiny_engine):
    session = tiny_engine.session(cache_size=256)
    messages = [{"role": "user", "content": "Hello"}]
    first = session.chat(messages, max_new_tokens=6)
    again = session.chat(messages, max_new_tokens=6)
    assert again.stats.restarts == 1
    assert again.token_ids == first.token_ids


def test_abandoned_stream_rolls_back_the_partial_reply(converse, tiny_engine):
    session = tiny_engine.session(cache_size=256)
    messages, _ = converse(session, QUESTIONS[:2])
    messages.append({"role": "user", "content": QUESTIONS[2]})
    stream = session.stream(messages, max_new_tokens=30)
    next(stream)
    next(stream)
    stream.close()
    assert session.transcript.messages == messages
    assert session.cache.token_ids.tolist() == rendered_ids(tiny_engine, messages)

    retried = session.chat(messages, max_new_tokens=10)
    fresh = tiny_engine.session(cache_size=256).chat(messages, max_new_tokens=10)
    assert retried.stats.restarts == 0
    assert retried.token_ids == fresh.token_ids


def test_interrupt_inside_a_forward_leaves_the_session_consistent(converse, tiny_torch_engine, monkeypatch):
    session = tiny_torch_engine.session(cache_size=256)
    messages, _ = converse(session, QUESTIONS[:2])
    messages.append({"role": "user", "content": QUESTIONS[2]})
    layer = tiny_torch_engine.model.backend.weights.model.layers[1]
    calls = {"n": 0}
    original = layer.forward

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of decoding, after layer 0 already appended its keys
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        session.chat(messages, max_new_tokens=20)
    monkeypatch.undo()
    assert held_lengths(session.cache.runner) == {len(session)}
    assert session.cache.token_ids.tolist() == rendered_ids(tiny_torch_engine, messages)
    reply = session.chat(messages, max_new_tokens=10)
    assert reply.token_ids == tiny_torch_engine.session(cache_size=256).chat(messages, max_new_tokens=10).token_ids


def test_streaming_pieces_join_to_the_reply(tiny_engine):
    session = tiny_engine.session()
    stream = session.stream([{"role": "user", "content": "Hello"}], max_new_tokens=16)
    pieces = list(stream.text())
    assert "".join(pieces) == stream.reply.text
    assert all(pieces) and not any("\ufffd" in p for p in pieces)
    assert stream.finish() is stream.reply  # finishing an exhausted stream still gives its reply


def test_stop_string_is_cut_and_never_streamed(tiny_engine):
    messages = [{"role": "user", "content": "Hello"}]
    full = tiny_engine.session().chat(messages, max_new_tokens=16)
    stop = full.text[5:8]
    assert len(stop) == 3 and full.text.index(stop) == 5
    stream = tiny_engine.session().stream(messages, max_new_tokens=16, stop=[stop, "never-there"])
    pieces = list(stream.text())
    assert stream.reply.text == full.text[:5] == "".join(pieces)
    assert stream.reply.finish_reason == "stop"


def test_sampling_is_seeded(tiny_engine):
    messages = [{"role": "user", "content": "Hello"}]

    def sample(**kwargs):
        return tiny_engine.session().chat(messages, max_new_tokens=12, **kwargs).token_ids

    assert sample(temperature=1.0, seed=7) == sample(temperature=1.0, seed=7)
    assert sample(temperature=1.0, seed=7) != sample(temperature=1.0, seed=8)
    assert sample(temperature=1.0, top_k=1, seed=3) == sample()
    assert sample(temperature=1.0, top_p=1e-6, seed=3) == sample()


def test_an_open_stream_blocks_a_second_call_in_the_same_thread(tiny_engine):
    session = tiny_engine.session()
    stream = session.stream([{"role": "user", "content": "Hello"}], max_new_tokens=8)
    next(stream)
    with pytest.raises(RuntimeError, match="still open"):
        session.chat([{"role": "user", "content": "Hello"}])
    stream.close()
    assert session.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2).stats.restarts == 1


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
        ([{"role": "user", "content": 42}], r"messages\[0\] \(user\): content must be a string, got int"),
        ([{"role": "user", "content": "hi"}, "oops"], r"messages\[1\] must be a dict"),
    ],
)
def test_bad_messages_are_value_errors_that_change_nothing(converse, tiny_engine, messages, error):
    session = tiny_engine.session()
    converse(session, ["Hello"])
    before = (session.cache.token_ids.clone(), session.transcript)
    with pytest.raises(ValueError, match=error):
        session.chat(messages)
    assert torch.equal(session.cache.token_ids, before[0]) and session.transcript is before[1]


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (dict(cache_size=20, start_size=4, recent_size=8), "at least start_size \\+ recent_size \\+ 16 = 28"),
        (dict(cache_size=10_000), "larger than the model's maximum length 4096"),
        (dict(decay=1.5), "decay must be in"),
        (dict(policy="lru"), "unknown policy 'lru'"),
        (dict(start_size=-1), "start_size must be a non-negative integer"),
    ],
)
def test_bad_session_settings_are_value_errors(tiny_engine, settings, error):
    with pytest.raises(ValueError, match=error):
        tiny_engine.session(**settings)


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(stop=[""]), "stop strings must be non-empty"),
    ],
)
def test_bad_generation_settings_are_value_errors(tiny_engine, settings, error):
    with pytest.raises(ValueError, match=error):
        tiny_engine.session().chat([{"role": "user", "content": "hi"}], **settings)


def test_ingest_prefills_messages_without_a_reply_as_a_turn(tiny_engine):
    session = tiny_engine.session(policy="full", decay=0.5)
    messages = [{"role": "user", "content": "My code is 4821."}, {"role": "assistant", "content": "Noted."}]
    turn = session.ingest(messages)
    assert session.cache.token_ids.tolist() == rendered_ids(tiny_engine, messages)
    assert turn.prefilled_tokens == len(session) == turn.input_tokens and turn.generated_tokens == 0
    assert session.transcript.messages == messages and session.stats.turns == 1
    scores = session.cache.scores.clone()
    messages += [{"role": "user", "content": "And my name is Ada."}, {"role": "assistant", "content": "Hi Ada."}]
    turn = session.ingest(messages)
    assert turn.reused_tokens == len(scores) and turn.restarts == 0
    assert torch.equal(session.cache.scores[: len(scores)], scores * 0.5)  # decayed once by the second turn
    assert session.cache.token_ids.tolist() == rendered_ids(tiny_engine, messages)
    # A reply after ingested messages equals one from a session that was never fed piecewise.
    question = messages + [{"role": "user", "content": "What is my code?"}]
    reply = session.chat(question, max_new_tokens=8)
    assert reply.stats.prefilled_tokens < 20
    assert reply.token_ids == tiny_engine.session(policy="full").chat(question, max_new_tokens=8).token_ids


def test_a_fork_continues_like_the_original_and_never_changes_it(converse, tiny_engine):
    session = tiny_engine.session(cache_size=64, policy="sirllm")
    messages, _ = converse(session, QUESTIONS[:3])
    fork = session.fork()
    assert fork.session_id != session.session_id and len(fork) == len(session)
    before = (session.cache.token_ids.clone(), session.cache.scores.clone(), session.transcript.length)
    question = messages + [{"role": "user", "content": "One more?"}]
    forked_reply = fork.chat(question, max_new_tokens=10)
    assert (session.cache.token_ids.tolist(), session.transcript.length) == (before[0].tolist(), before[2])
    assert torch.equal(session.cache.scores, before[1])
    assert session.chat(question, max_new_tokens=10).token_ids == forked_reply.token_ids
    assert held_lengths(fork.cache.runner) == {len(fork)}
