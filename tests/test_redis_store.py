"""The Redis session store against a real ``redis-server``: fenced leases between two owners, a commit refused once
the lease lapsed, every turn committed so another replica continues it with the same greedy replies, a corrupted
blob refused while the previous commit stays readable, and sessions that survive a restart of Redis (append-only
file on)."""

from __future__ import annotations

import contextlib
import re

import pytest
from redis_fixtures import redis_server
from sirllm_fixtures import reply_token_ids

from sirllm_agents import Engine, SessionBusyError, SessionConfig, SessionFileError, SessionStoreUnavailable

CACHE = dict(cache_size=64, decay=0.9)  # small enough that the conversation below evicts
SCRIPT = ["Hi there!", "What is 2+2?", "Name a colour.", "Tell me a joke."]


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def make_store(redis, request):
    """Stores on the module's Redis under a prefix of this test's own, so tests never see each other's keys."""
    from sirllm_agents.redis_store import RedisStore

    made = []

    def make(owner: str, **options) -> RedisStore:
        store = RedisStore(redis.url, owner=owner, prefix=f"test-{request.node.name}:", **options)
        made.append(store)
        return store

    yield make
    for store in made:
        with contextlib.suppress(SessionStoreUnavailable):
            store.release_all()


def replica(tiny_engine, store) -> Engine:
    return Engine(tiny_engine.model, config=SessionConfig(**CACHE), store=store)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
def uninterrupted(tiny_engine) -> list[list[int]]:
    return reply_token_ids(tiny_engine.session(**CACHE), SCRIPT)


@pytest.fixture(scope="module")
def client(redis):
    """A connection of the test's own, to look at and tamper with what the stores wrote."""
    import redis as redis_py

    with redis_py.Redis.from_url(redis.url) as connection:
        yield connection


def expire_lease(client, store, session_id: str) -> None:
    """What a holder that stalls past its lease leaves behind: the lease gone from Redis, its renewals not arriving."""
    client.delete(store.keys(session_id).lease)


def test_leases_exclude_a_second_owner_and_every_grant_gets_a_larger_fencing_token(make_store):
    a, b = make_store("a"), make_store("b")
    a.acquire("conv")
    first = a.token("conv")
    a.acquire("conv")  # taken again by its holder: the same grant, extended
    assert a.token("conv") == first
    with pytest.raises(SessionBusyError, match=r"held by another server \(a\)") as busy:
        b.acquire("conv")
    assert 0 < busy.value.retry_after <= a.lease_seconds and b.token("conv") is None
    a.release("conv")
    b.acquire("conv")
    assert b.token("conv") == first + 1
    assert not a.holds("conv") and b.holds("conv")


def test_a_replica_restarted_under_its_name_takes_its_own_leases_over_at_once(make_store):
    before = make_store("r1")
    before.acquire("conv")
    old_token = before.token("conv")
    after = make_store("r1")  # the same replica name, a new process: its previous run's lease is its own
    after.acquire("conv")
    assert after.token("conv") == old_token + 1
    assert not before.holds("conv")  # the previous grant is fenced off
    with pytest.raises(SessionBusyError, match=r"\(r1\)"):
        make_store("r2").acquire("conv")


def test_a_commit_after_the_lease_lapsed_is_refused_and_the_stale_copy_dropped(tiny_engine, make_store, client):
    a, b = make_store("a"), make_store("b")
    stale, fresh = replica(tiny_engine, a), replica(tiny_engine, b)
    messages = [user(SCRIPT[0])]
    stream = stale.stream(messages, "conv", max_new_tokens=6)
    reply, session = stream.finish(), stream.session  # committed by a
    expire_lease(client, a, "conv")
    messages += [reply.as_message(), user(SCRIPT[1])]
    taken = fresh.chat(messages, "conv", max_new_tokens=6)  # b takes the session over: a larger token
    assert taken.stats.reused_tokens > 0 and b.token("conv") > 1

    # a never learnt it lost the lease; its commit of this copy is refused, naming the holder.
    with pytest.raises(SessionBusyError, match=r"held by another server \(b\)"):
        a.commit(session)
    assert a.token("conv") is None
    # Served through the engine, a finds its lease gone before answering from the stale copy, and refuses.
    with pytest.raises(SessionBusyError, match=r"\(b\)"):
        stale.chat(messages, "conv", max_new_tokens=6)
    assert "conv" not in stale.pool.live_ids()
    assert b.read_state(tiny_engine.model, "conv").transcript.messages[-1]["content"] == taken.content


def test_every_turn_is_committed_so_another_replica_continues_with_the_same_replies(
    tiny_engine, make_store, client, uninterrupted
):
    messages = []
    for turn, text in enumerate(SCRIPT):
        store = make_store(f"r{turn}")
        server = replica(tiny_engine, store)  # a new replica each turn; the one before "crashed" holding its lease
        messages.append(user(text))
        reply = server.chat(messages, "conv", max_new_tokens=6)
        assert reply.token_ids == uninterrupted[turn], turn
        assert turn == 0 or reply.stats.reused_tokens > 0  # continued from the last commit, not re-prefilled
        size, seconds = store.last_commit
        assert size > 0 and seconds > 0
        messages.append({"role": "assistant", "content": reply.text})
        expire_lease(client, store, "conv")


def test_a_corrupted_blob_is_refused_clearly_and_the_previous_commit_stays_readable(tiny_engine, make_store, client):
    # A cache nothing is evicted from: continuing from an older commit then gives the uninterrupted replies too.
    unbounded = dict(cache_size=512)
    uninterrupted = reply_token_ids(tiny_engine.session(**unbounded), SCRIPT)
    store = make_store("a")
    server, messages = Engine(tiny_engine.model, config=SessionConfig(**unbounded), store=store), []
    for text in SCRIPT[:2]:
        messages.append(user(text))
        messages.append({"role": "assistant", "content": server.chat(messages, "conv", max_new_tokens=6).text})
    key = store.keys("conv").blob
    client.setrange(key, client.strlen(key) - 10, b"\xff" * 4)  # a few bytes of the tensors flipped

    with pytest.raises(SessionFileError, match=re.escape(f"key {key}: corrupted session file (checksum mismatch)")):
        store.read_state(tiny_engine.model, "conv")
    previous = store.read_state(tiny_engine.model, "conv", previous=True)
    assert len(previous.transcript.messages) == 2  # the commit of the first turn

    # Another replica continues from the previous commit (the messages sent hold the rest): the same reply.
    expire_lease(client, store, "conv")
    other = Engine(tiny_engine.model, config=SessionConfig(**unbounded), store=make_store("b"))
    messages.append(user(SCRIPT[2]))
    assert other.chat(messages, "conv", max_new_tokens=6).token_ids == uninterrupted[2]


def test_sessions_survive_a_restart_of_redis(tiny_engine, make_store, redis, uninterrupted):
    store = make_store("a")
    server, messages = replica(tiny_engine, store), []
    for text in SCRIPT[:2]:
        messages.append(user(text))
        messages.append({"role": "assistant", "content": server.chat(messages, "conv", max_new_tokens=6).text})
    redis.restart()
    assert store.holds("conv")  # the lease too: redis-py reconnects, the append-only file kept the key
    messages.append(user(SCRIPT[2]))
    reply = server.chat(messages, "conv", max_new_tokens=6)
    assert reply.token_ids == uninterrupted[2]
    later = make_store("b").read_state(tiny_engine.model, "conv")
    assert later.transcript.messages[-1]["content"] == reply.content


def test_an_unreachable_redis_is_an_error_that_says_the_turn_was_not_acknowledged(tiny_engine, make_store, redis):
    store = make_store("a")
    server = replica(tiny_engine, store)
    server.chat([user(SCRIPT[0])], "conv", max_new_tokens=6)
    redis.stop()
    try:
        with pytest.raises(SessionStoreUnavailable, match=r"the turn was not acknowledged: retry once Redis answers"):
            server.chat([user(SCRIPT[0]), user(SCRIPT[1])], "conv", max_new_tokens=6)
    finally:
        redis.start()
