"""The engine's session pool: routing by longest transcript prefix and by id, the LRU cap with spill and exact
reload, and concurrent calls from threads and asyncio giving the same greedy replies as a serial run."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from sirllm_agents import Engine, SessionConfig
from sirllm_agents.store import DirectoryStore

CACHE = dict(cache_size=64, decay=0.9)  # small enough that every conversation below evicts
SCRIPTS = {
    "a": ["Hi there!", "What is 2+2?", "Name a colour.", "Tell me a joke."],
    "b": ["Plan a trip to Rome.", "Which museums?", "And food?", "Budget?"],
    "c": ["Write a haiku.", "Another one.", "About the sea.", "Shorter."],
    "d": ["Help me debug.", "It says KeyError.", "In a dict.", "Fixed it."],
}


def pooled_engine(tiny_engine, tmp_path, **settings) -> Engine:
    """An engine of its own (own pool) on the shared tiny model."""
    return Engine(tiny_engine.model, spill_dir=tmp_path, config=SessionConfig(**CACHE), **settings)


def serial_replies(engine: Engine, script: list[str], system: str | None = None) -> list[list[int]]:
    """The replies of one uninterrupted session, for comparison."""
    session = engine.session(**CACHE)
    messages = [{"role": "system", "content": system}] if system else []
    replies = []
    for text in script:
        messages.append({"role": "user", "content": text})
        reply = session.chat(messages, max_new_tokens=6)
        replies.append(reply.token_ids)
        messages.append({"role": "assistant", "content": reply.text})
    return replies


@pytest.fixture(scope="module")
def expected(tiny_engine):
    return {name: serial_replies(tiny_engine, script) for name, script in SCRIPTS.items()}


def test_calls_are_routed_to_the_longest_transcript_prefix(tiny_engine, tmp_path):
    engine = pooled_engine(tiny_engine, tmp_path)
    u = lambda text: {"role": "user", "content": text}  # noqa: E731
    a = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    short_reply = engine.chat([u("Hello")], "short", max_new_tokens=4).text
    base = [u("Hello"), a(short_reply), u("More")]
    long_reply = engine.chat(base, "long", max_new_tokens=4).text  # a second session holding a longer transcript
    assert engine.route(base + [a(long_reply), u("Next")]).session_id == "long"
    assert engine.route([u("Hello"), a(short_reply), u("Something else")]).session_id == "short"
    assert engine.route([u("Hello")]).session_id not in ("short", "long")  # no transcript is a prefix of it
    assert engine.route(
        base + [a(long_reply)], tools=[{"type": "function", "function": {"name": "f"}}]
    ).session_id not in ("short", "long")  # other tools render another text: not a prefix

    ingested = engine.route(base, "long").transcript.length
    reply = engine.chat(base + [a(long_reply), u("Next")], max_new_tokens=4)
    assert reply.stats.restarts == 0 and reply.stats.reused_tokens == ingested


def test_a_resent_json_conversation_finds_its_session(tiny_engine, tmp_path):
    """The session holds the format instructions the core adds; routing matches the resent messages the same way."""
    engine = pooled_engine(tiny_engine, tmp_path)
    json_mode = {"response_format": {"type": "json_object"}, "max_new_tokens": 8}
    messages = [{"role": "user", "content": "A colour as JSON."}]
    first = engine.chat(messages, **json_mode)
    messages += [first.as_message(), {"role": "user", "content": "Another."}]
    second = engine.chat(messages, **json_mode)
    assert second.session_id == first.session_id and len(engine.pool.live_ids()) == 1
    assert second.stats.restarts == 0 and second.stats.reused_tokens > first.stats.input_tokens


def test_a_one_off_call_runs_on_a_copy_and_leaves_the_pool_as_it_was(tiny_engine, tmp_path):
    """A side call continuing a conversation reuses what its session holds, on a copy; the session is untouched and
    its next turn is the reply it would have been. A one-off call that continues nothing leaves no session."""
    engine = pooled_engine(tiny_engine, tmp_path)
    messages = [{"role": "user", "content": "Plan a trip to Rome."}]
    first = engine.chat(messages, "trip", max_new_tokens=6)
    messages += [first.as_message(), {"role": "user", "content": "Which museums?"}]
    session = engine.route([], "trip")
    held, cached = session.transcript.length, session.cache.token_ids.clone()

    side = engine.chat(messages + [{"role": "user", "content": "Summarise."}], one_off=True, max_new_tokens=6)
    assert side.session_id != "trip" and side.stats.reused_tokens == held and side.stats.restarts == 0
    assert engine.pool.live_ids() == ["trip"] and session.transcript.length == held
    assert torch.equal(session.cache.token_ids, cached)

    engine.chat([{"role": "user", "content": "Unrelated."}], one_off=True, max_new_tokens=4)
    assert engine.pool.live_ids() == ["trip"]
    after = engine.chat(messages, "trip", max_new_tokens=6)
    alone = pooled_engine(tiny_engine, tmp_path / "alone")
    alone.chat(messages[:1], "trip", max_new_tokens=6)
    assert after.token_ids == alone.chat(messages, "trip", max_new_tokens=6).token_ids


def test_an_async_stream_names_its_session_with_the_first_event_and_finishes_twice(tiny_engine, tmp_path):
    engine = pooled_engine(tiny_engine, tmp_path)

    async def run():
        stream = engine.astream([{"role": "user", "content": "Hi"}], "named", max_new_tokens=4)
        async for _ in stream:
            assert stream.session is not None and stream.session.session_id == "named"
        assert (await asyncio.wait_for(stream.finish(), 5)) is stream.reply  # exhausted already: returns at once
        return stream.reply

    assert asyncio.run(run()).stats.generated_tokens > 0


def test_spilled_sessions_come_back_with_the_same_replies(tiny_engine, tmp_path, expected):
    engine = pooled_engine(tiny_engine, tmp_path, max_live_sessions=2)
    history = {name: [] for name in SCRIPTS}
    for turn in range(len(SCRIPTS["a"])):
        for name, script in SCRIPTS.items():  # round robin over four conversations: each one is spilled in between
            history[name].append({"role": "user", "content": script[turn]})
            session_id = name if name in "ab" else None  # two by id, two by prefix routing
            reply = engine.chat(history[name], session_id, max_new_tokens=6)
            assert reply.token_ids == expected[name][turn], (name, turn)
            assert reply.stats.restarts == 0 and (turn == 0 or reply.stats.reused_tokens > 0)
            assert reply.stats.cache_len <= 64
            history[name].append({"role": "assistant", "content": reply.text})
            assert len(engine.pool.live_ids()) <= 2
    assert len(engine.pool.spilled_ids()) == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert engine.drop_session(engine.pool.spilled_ids()[0])
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_spilled_files_past_the_cap_are_deleted_longest_idle_first(tiny_engine, tmp_path, expected):
    engine = pooled_engine(tiny_engine, tmp_path, max_live_sessions=1, max_spilled_sessions=2)
    history = {name: [{"role": "user", "content": SCRIPTS[name][0]}] for name in "abcd"}
    for name in "abcd":
        reply = engine.chat(history[name], name, max_new_tokens=6)
        history[name].append({"role": "assistant", "content": reply.text})
    assert engine.pool.live_ids() == ["d"] and engine.pool.spilled_ids() == ["b", "c"]  # a's file went first
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    # b comes back from its file, exactly; a starts afresh from the messages sent, as a new session would.
    history["b"].append({"role": "user", "content": SCRIPTS["b"][1]})
    assert engine.chat(history["b"], "b", max_new_tokens=6).token_ids == expected["b"][1]
    history["a"].append({"role": "user", "content": SCRIPTS["a"][1]})
    again = engine.chat(history["a"], "a", max_new_tokens=6)
    assert again.stats.reused_tokens == 0
    assert again.token_ids == engine.session(**CACHE).chat(history["a"], max_new_tokens=6).token_ids
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and "a" not in engine.pool.spilled_ids()


def test_eight_threads_driving_four_conversations_match_a_serial_run(tiny_engine, tmp_path, expected):
    """Each conversation is driven by two threads taking turns; the cap of two live sessions forces spills and
    reloads while other threads are mid-call."""
    engine = pooled_engine(tiny_engine, tmp_path, max_live_sessions=2)
    turns = len(SCRIPTS["a"])
    done = {name: [threading.Event() for _ in range(turns)] for name in SCRIPTS}
    history = {name: [] for name in SCRIPTS}
    replies = {name: [] for name in SCRIPTS}
    errors = []

    def drive(name: str, parity: int) -> None:
        try:
            for turn in range(parity, turns, 2):
                if turn:
                    assert done[name][turn - 1].wait(timeout=300)
                messages = history[name] + [{"role": "user", "content": SCRIPTS[name][turn]}]
                reply = engine.chat(messages, name if name in "ac" else None, max_new_tokens=6)
                assert reply.stats.cache_len <= 64
                replies[name].append(reply.token_ids)
                history[name] = messages + [{"role": "assistant", "content": reply.text}]
                done[name][turn].set()
        except BaseException as error:
            errors.append(error)
            for event in done[name]:
                event.set()

    threads = [threading.Thread(target=drive, args=(name, p)) for name in SCRIPTS for p in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert replies == expected
    assert len(engine.pool.live_ids()) <= 2 and not engine.pool._pins
    for name in SCRIPTS:
        session = engine.route(history[name], name if name in "ac" else None)
        assert session.transcript.messages == history[name] and len(session) <= 64


def test_two_threads_on_one_session_are_serialized(tiny_engine, tmp_path):
    engine = pooled_engine(tiny_engine, tmp_path)
    messages = [{"role": "user", "content": "Hello"}]
    expected = serial_replies(tiny_engine, ["Hello"])[0]
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(engine.chat(messages, "same", max_new_tokens=6)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # The second call finds the first one's reply in the transcript and restarts from the messages it was given.
    assert [r.token_ids for r in results] == [expected, expected]
    assert sorted(r.stats.restarts for r in results) == [0, 1]
    session = engine.route(messages, "same")
    expected_ids = tiny_engine.model.encode(
        tiny_engine.model.template.render(messages + [{"role": "assistant", "content": results[1].text}], False)
    )
    assert session.cache.token_ids.tolist() == expected_ids


def test_asyncio_calls_interleave_and_match_a_serial_run(tiny_engine, tmp_path, expected):
    engine = pooled_engine(tiny_engine, tmp_path, max_live_sessions=3)

    async def conversation(name: str) -> list[list[int]]:
        messages, out = [], []
        for text in SCRIPTS[name][:3]:
            messages.append({"role": "user", "content": text})
            reply = await engine.achat(messages, max_new_tokens=6)
            out.append(reply.token_ids)
            messages.append({"role": "assistant", "content": reply.text})
        return out

    async def everything():
        return await asyncio.gather(*(conversation(name) for name in SCRIPTS))

    results = asyncio.run(everything())
    assert results == [expected[name][:3] for name in SCRIPTS]


def test_a_pooled_stream_is_pinned_until_it_ends(tiny_engine, tmp_path):
    engine = pooled_engine(tiny_engine, tmp_path, max_live_sessions=1)
    stream = engine.stream([{"role": "user", "content": "Hello"}], "streamed", max_new_tokens=6)
    assert engine.pool.live_ids() == []  # nothing is routed before the first piece is asked for
    pieces = [next(stream).text]
    engine.chat([{"role": "user", "content": "Another conversation"}], "other", max_new_tokens=2)
    # The cap of one holds for the idle session; the one mid-stream is pinned and stays.
    assert engine.pool.live_ids() == ["streamed"] and engine.pool.spilled_ids() == ["other"]
    pieces += list(stream.text())
    assert "".join(pieces) == stream.reply.text
    assert not engine.pool._pins
    engine.chat([{"role": "user", "content": "A third"}], "third", max_new_tokens=2)
    assert engine.pool.live_ids() == ["third"] and set(engine.pool.spilled_ids()) == {"streamed", "other"}


def test_bad_pool_settings_are_value_errors(tiny_engine):
    with pytest.raises(ValueError, match="max_live_sessions must be a positive integer, got 0"):
        Engine(tiny_engine.model, max_live_sessions=0)
    with pytest.raises(ValueError, match="max_spilled_sessions must be a non-negative integer, got -1"):
        Engine(tiny_engine.model, max_spilled_sessions=-1)
    with pytest.raises(ValueError, match="decay must be in"):
        Engine(tiny_engine.model, config=SessionConfig(decay=2.0))


@pytest.mark.parametrize("session_id", ["", 7, b"conv"])
def test_bad_session_ids_are_value_errors_that_change_nothing(tiny_engine, session_id):
    engine = Engine(tiny_engine.model)
    engine.chat([{"role": "user", "content": "Hi"}], "kept", max_new_tokens=2)
    with pytest.raises(ValueError, match=f"session_id must be a non-empty string, got {session_id!r}"):
        engine.chat([{"role": "user", "content": "Hi"}], session_id, max_new_tokens=2)
    assert engine.pool.live_ids() == ["kept"] and not engine.pool._pins


class GatedStore(DirectoryStore):
    """A store whose write of session "a" waits for ``gate``: a slow disk, or a spill to a network mount."""

    def __init__(self, folder):
        super().__init__(folder)
        self.gate, self.writing = threading.Event(), threading.Event()

    def save(self, session):
        if session.session_id == "a":
            self.writing.set()
            assert self.gate.wait(timeout=300)
        return super().save(session)


def test_a_slow_spill_stalls_only_its_own_conversation(tiny_engine, tmp_path, expected):
    store = GatedStore(tmp_path)
    engine = Engine(tiny_engine.model, store=store, config=SessionConfig(**CACHE), max_live_sessions=1)
    first = {name: [{"role": "user", "content": SCRIPTS[name][0]}] for name in "abc"}
    a = engine.chat(first["a"], "a", max_new_tokens=6)
    replies = {}

    def chat(name, messages):
        replies[name] = engine.chat(messages, name, max_new_tokens=6).token_ids

    # b's call pushes a out of memory; a's write hangs (in b's thread, before b's reply).
    b = threading.Thread(target=chat, args=("b", first["b"]))
    b.start()
    assert store.writing.wait(timeout=300)
    assert "a" not in engine.pool.live_ids() + engine.pool.spilled_ids()  # moving: its file is being written
    # A call for a waits for its file; c's call meanwhile runs to its end (spilling b, whose write is not gated).
    history_a = first["a"] + [{"role": "assistant", "content": a.text}, {"role": "user", "content": SCRIPTS["a"][1]}]
    waiting = threading.Thread(target=chat, args=("a", history_a))
    waiting.start()
    chat("c", first["c"])
    assert replies["c"] == expected["c"][0]
    assert "a" not in replies and waiting.is_alive()
    store.gate.set()
    for thread in (b, waiting):
        thread.join(timeout=300)
    assert replies["b"] == expected["b"][0]
    assert replies["a"] == expected["a"][1]  # read back from its file, exactly
    assert len(engine.pool.live_ids()) == 1 and not engine.pool._moving and not engine.pool._pins
