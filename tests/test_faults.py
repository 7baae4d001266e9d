"""Faults through the engine's pool: interrupts and exceptions mid-generation, a 100,000-token tool result,
empty and whitespace messages, a system prompt dropped halfway, and an unreadable spill file. None may crash the
engine or touch another conversation."""

from __future__ import annotations

import logging
import threading

import pytest
from sirllm_fixtures import held_lengths

from sirllm_agents import Engine, SessionConfig

CACHE = dict(cache_size=128)


def pooled_engine(tiny_engine, tmp_path, **settings) -> Engine:
    return Engine(tiny_engine.model, spill_dir=tmp_path, config=SessionConfig(**CACHE), **settings)


def user(text):
    return {"role": "user", "content": text}


def fresh_reply(tiny_engine, messages, max_new_tokens=6) -> list[int]:
    return tiny_engine.session(**CACHE).chat(messages, max_new_tokens=max_new_tokens).token_ids


def test_an_interrupt_mid_generation_rolls_back_one_session_and_spares_the_other(
    tiny_torch_engine, tmp_path, monkeypatch
):
    tiny_engine = tiny_torch_engine  # interrupted inside a PyTorch layer
    engine = pooled_engine(tiny_engine, tmp_path)
    other = [user("Keep talking to me.")]
    other.append({"role": "assistant", "content": engine.chat(other, "other", max_new_tokens=6).text})
    victim = [user("This one gets interrupted.")]

    layer = tiny_engine.model.backend.weights.model.layers[1]
    original, calls = layer.forward, {"n": 0}
    victim_thread = threading.get_ident()

    def interrupted(*args, **kwargs):
        if threading.get_ident() == victim_thread:
            calls["n"] += 1
            if calls["n"] == 4:  # mid-decode, after layer 0 appended its keys
                raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.chat(victim, "victim", max_new_tokens=12)
    monkeypatch.undo()

    assert not engine.pool._pins  # the interrupted call released its session
    session = engine.route(victim, "victim")
    assert session.transcript.messages == victim
    assert held_lengths(session.cache.runner) == {len(session)}
    assert engine.chat(victim, "victim", max_new_tokens=6).token_ids == fresh_reply(tiny_engine, victim)
    other_next = other + [user("And then?")]
    reply = engine.chat(other_next, "other", max_new_tokens=6)
    assert reply.stats.restarts == 0
    assert reply.token_ids == fresh_reply(tiny_engine, other_next)  # no eviction yet: equal to a fresh prefill


def test_a_consumer_that_breaks_off_a_stream_leaves_the_conversation_retryable(tiny_engine, tmp_path):
    engine = pooled_engine(tiny_engine, tmp_path)
    messages = [user("Tell me something long.")]
    stream = engine.stream(messages, "s", max_new_tokens=30)
    with pytest.raises(RuntimeError, match="consumer failed"):
        for i, _ in enumerate(stream):
            if i == 2:
                raise RuntimeError("consumer failed")
    stream.close()
    assert not engine.pool._pins
    assert engine.route(messages, "s").transcript.messages == messages
    assert engine.chat(messages, "s", max_new_tokens=6).token_ids == fresh_reply(tiny_engine, messages)


# Every prompt token is scored over the whole vocabulary (SirLLM needs each token's entropy), so 100,000 tokens take
# minutes even on the tiny model: that size is marked slow; the quick size checks the same behaviour.
@pytest.mark.parametrize(
    "rows", [pytest.param(1_000, id="6k-tokens"), pytest.param(17_000, marks=pytest.mark.slow, id="100k-tokens")]
)
def test_a_huge_tool_result_stays_within_the_bound_and_spares_other_sessions(tiny_engine, tmp_path, rows):
    engine = pooled_engine(tiny_engine, tmp_path)
    bystander = [user("Hello there")]
    bystander_reply = engine.chat(bystander, "bystander", max_new_tokens=6)
    table = " ".join(f"r{i}={i * 7919 % 100003}" for i in range(rows))
    messages = [
        user("Summarize the table."),
        {"role": "assistant", "content": "Calling the tool."},
        {"role": "tool", "content": table},
    ]
    size = len(tiny_engine.model.encode(table))
    assert size > 5.8 * rows
    # Another conversation is served while the huge one is being ingested: only calls on one session wait.
    ingesting, served, results = threading.Event(), threading.Event(), {}

    def hold(done: int, total: int) -> None:  # the huge call stays mid-ingestion until the other one is served
        ingesting.set()
        served.wait(timeout=60)

    engine.route(messages, "huge").progress = hold
    worker = threading.Thread(target=lambda: results.update(reply=engine.chat(messages, "huge", max_new_tokens=6)))
    worker.start()
    assert ingesting.wait(timeout=300)
    nxt = bystander + [{"role": "assistant", "content": bystander_reply.text}, user("Again")]
    assert engine.chat(nxt, "bystander", max_new_tokens=6).token_ids == fresh_reply(tiny_engine, nxt)
    assert worker.is_alive()  # served while the huge call was mid-ingestion, not after it
    served.set()
    worker.join()
    reply = results["reply"]
    assert reply.stats.input_tokens > size and reply.stats.generated_tokens > 0
    assert reply.stats.cache_len <= 128
    session = engine.route(messages, "huge")
    assert len(session) <= 128 and session.cache.positions[:4].tolist() == [0, 1, 2, 3]
    memory = session.memory()
    assert sum(memory.evicted_per_turn.values()) == len(memory.conversation) - len(session)


@pytest.mark.parametrize("content", ["", "   \n\t "])
def test_empty_and_whitespace_messages_are_taken_as_they_are(tiny_engine, tmp_path, content):
    """Documented behaviour: an empty or whitespace message is a valid message, rendered by the chat template as
    it is, and answered; it neither raises nor restarts the conversation."""
    engine = pooled_engine(tiny_engine, tmp_path)
    first = [user(content)]
    reply = engine.chat(first, "c", max_new_tokens=6)
    assert reply.token_ids == fresh_reply(tiny_engine, first)
    following = first + [
        {"role": "assistant", "content": reply.text},
        user("Now a real question?"),
    ]
    second = engine.chat(following, "c", max_new_tokens=6)
    assert second.stats.restarts == 0 and second.token_ids == fresh_reply(tiny_engine, following)


def test_dropping_the_system_prompt_halfway(tiny_engine, tmp_path):
    """Documented behaviour: a message list that no longer starts with the session's messages is a new
    conversation. By id, that session restarts from the new list; by prefix routing, a new session takes it and the
    original stays as it was."""
    engine = pooled_engine(tiny_engine, tmp_path)
    with_system = [{"role": "system", "content": "You are terse."}, user("Hi")]
    with_system.append({"role": "assistant", "content": engine.chat(with_system, max_new_tokens=6).text})
    original = engine.route(with_system)
    dropped = with_system[1:] + [user("Go on")]

    routed = engine.chat(dropped, max_new_tokens=6)
    assert routed.stats.restarts == 0 and routed.stats.reused_tokens == 0  # a new session
    assert routed.token_ids == fresh_reply(tiny_engine, dropped)
    assert engine.route(with_system) is original and original.transcript.messages == with_system
    continued = with_system + [user("Go on")]
    assert engine.chat(continued, max_new_tokens=6).token_ids == fresh_reply(tiny_engine, continued)

    engine.chat(with_system[:2], "named", max_new_tokens=6)
    named = engine.chat(dropped, "named", max_new_tokens=6)
    assert named.stats.restarts == 1 and named.token_ids == fresh_reply(tiny_engine, dropped)


def test_an_unreadable_spill_file_starts_the_conversation_afresh(tiny_engine, tmp_path, caplog):
    engine = pooled_engine(tiny_engine, tmp_path, max_live_sessions=1)
    first = [user("Remember me.")]
    first.append({"role": "assistant", "content": engine.chat(first, "spilled", max_new_tokens=6).text})
    engine.chat([user("Someone else.")], "pushes-it-out", max_new_tokens=2)
    [path] = list(tmp_path.glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])
    nxt = first + [user("Still there?")]
    with caplog.at_level(logging.WARNING, logger="sirllm_agents.pool"):
        reply = engine.chat(nxt, "spilled", max_new_tokens=6)
    assert "could not be read back, starting it afresh" in caplog.text
    assert reply.stats.reused_tokens == 0 and reply.token_ids == fresh_reply(tiny_engine, nxt)
