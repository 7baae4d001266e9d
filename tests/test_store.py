"""Session stores: a folder shared by two engines (as by two server processes) hands a conversation from one to the
other with the same greedy replies, and its leases keep two of them from ever holding one session at once."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sirllm_fixtures import reply_token_ids

from sirllm_agents import Engine, SessionBusyError, SessionConfig, SharedDirectoryStore
from sirllm_agents.store import file_key

CACHE = dict(cache_size=64, decay=0.9)  # small enough that the conversation below evicts
SCRIPT = ["Hi there!", "What is 2+2?", "Name a colour.", "Tell me a joke."]


def replica(tiny_engine, folder, owner: str, **lease) -> Engine:
    store = SharedDirectoryStore(folder, owner=owner, **lease)
    return Engine(tiny_engine.model, config=SessionConfig(**CACHE), store=store)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
def uninterrupted(tiny_engine) -> list[list[int]]:
    return reply_token_ids(tiny_engine.session(**CACHE), SCRIPT)


def test_a_conversation_moves_between_replicas_with_the_same_replies(tiny_engine, tmp_path, uninterrupted):
    a, b = replica(tiny_engine, tmp_path, "a"), replica(tiny_engine, tmp_path, "b")
    messages, served_by = [], []
    for turn, text in enumerate(SCRIPT):
        server, holder = (a, b) if turn % 2 == 0 else (b, a)
        messages.append(user(text))
        if turn:
            with pytest.raises(SessionBusyError, match="held by another server") as busy:
                server.chat(messages, "conv", max_new_tokens=6)
            assert busy.value.owner == holder.pool.store.owner and busy.value.retry_after > 0
            assert "conv" not in server.pool.live_ids()  # the refused replica took nothing
            assert holder.pool.spill_all() == 1  # the holder hands it over (as when idle, or stopping)
        reply = server.chat(messages, "conv", max_new_tokens=6)
        assert reply.token_ids == uninterrupted[turn], turn
        assert turn == 0 or reply.stats.reused_tokens > 0  # continued from the other replica's saved cache
        served_by.append(server.pool.store.owner)
        messages.append({"role": "assistant", "content": reply.text})
    assert served_by == ["a", "b", "a", "b"]
    names = sorted(path.suffix for path in tmp_path.iterdir() if path.is_file())
    assert names == [".lease", ".safetensors"]  # tensors and JSON: nothing pickled
    assert [path.suffix for path in (tmp_path / ".locks").iterdir()] == [".lock"]


def test_a_lapsed_lease_is_taken_over_from_the_last_turn_and_the_stale_holder_reads_the_new_copy(
    tiny_engine, tmp_path, uninterrupted
):
    a, b = replica(tiny_engine, tmp_path, "a"), replica(tiny_engine, tmp_path, "b")
    messages = []
    for text in SCRIPT[:2]:  # a never spills: each turn is committed to the store before it is answered
        messages.append(user(text))
        messages.append({"role": "assistant", "content": a.chat(messages, "conv", max_new_tokens=6).text})

    # a stalls: its lease runs out (written as expired here) and b takes the session over from a's last commit.
    lease_path = tmp_path / f"{file_key('conv')}.lease"
    lease = json.loads(lease_path.read_text())
    lease_path.write_text(json.dumps({**lease, "expires": time.time() - 1}))
    messages.append(user(SCRIPT[2]))
    taken = b.chat(messages, "conv", max_new_tokens=6)
    assert taken.token_ids == uninterrupted[2]  # as if a had never stalled
    assert taken.stats.restarts == 0 and taken.stats.reused_tokens > 0
    messages.append({"role": "assistant", "content": taken.text})
    assert json.loads(lease_path.read_text())["owner"] == "b"
    b.pool.spill_all()

    # a still has its stale copy in memory: it must notice the lease changed hands and read b's copy instead.
    assert a.pool.live_ids() == ["conv"]
    messages.append(user(SCRIPT[3]))
    back = a.chat(messages, "conv", max_new_tokens=6)
    assert back.token_ids == uninterrupted[3]
    assert back.stats.restarts == 0 and back.stats.reused_tokens > 0


def test_only_one_of_many_contenders_gets_a_lease(tmp_path):
    stores = [SharedDirectoryStore(tmp_path, owner=f"r{i}") for i in range(8)]
    start, won, busy = threading.Barrier(8), [], []

    def contend(store: SharedDirectoryStore) -> None:
        start.wait()
        try:
            store.acquire("contested")
            won.append(store.owner)
        except SessionBusyError as error:
            busy.append(error.owner)

    threads = [threading.Thread(target=contend, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(won) == 1 and busy == [won[0]] * 7


def test_leases_are_renewed_while_held_and_free_once_released(tmp_path):
    holder = SharedDirectoryStore(tmp_path, owner="holder", lease_seconds=0.3)
    other = SharedDirectoryStore(tmp_path, owner="other", lease_seconds=0.3)
    holder.acquire("s")
    time.sleep(1.0)  # three lease lengths: only renewals keep it
    with pytest.raises(SessionBusyError) as busy:
        other.acquire("s")
    assert busy.value.owner == "holder" and 0 < busy.value.retry_after <= 0.3
    holder.release("s")
    other.acquire("s")
    assert not holder.holds("s") and other.holds("s") and other.held() == ["s"]


def test_an_expired_lease_of_a_dead_process_is_taken_over(tmp_path):
    store = SharedDirectoryStore(tmp_path, owner="alive")
    lease = tmp_path / f"{file_key('s')}.lease"
    lease.write_text(json.dumps({"session_id": "s", "owner": "dead:1", "token": "t", "expires": time.time() + 60}))
    with pytest.raises(SessionBusyError, match=r"held by another server \(dead:1\); retry in 60 s"):
        store.acquire("s")
    lease.write_text(json.dumps({"session_id": "s", "owner": "dead:1", "token": "t", "expires": time.time() - 1}))
    store.acquire("s")
    assert json.loads(lease.read_text())["owner"] == "alive"


def test_a_store_and_a_spill_dir_together_are_refused(tiny_engine, tmp_path):
    with pytest.raises(ValueError, match="give spill_dir or store, not both"):
        Engine(tiny_engine.model, spill_dir=tmp_path, store=SharedDirectoryStore(tmp_path))
    with pytest.raises(ValueError, match="lease_seconds must be positive"):
        SharedDirectoryStore(tmp_path, lease_seconds=0)
