"""Replicas on Redis, as real processes: ``sirllm-agents serve --session-store redis://...`` servers sharing one
``redis-server``. Behind vllm-router (consistent hashing on ``X-Session-Id``) each conversation stays on one replica
and gets a single process's replies; a replica killed mid-conversation, reached directly or behind the router, loses
no acknowledged turn (the next turn, on another replica, gives the uninterrupted reply); a replica stopped past its
lease has its commit refused and never answers from its stale copy; sessions survive a restart of Redis."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra")
pytest.importorskip("uvicorn", reason="the server needs the serve extra")

import httpx
from redis_fixtures import redis_server, skip_or_fail
from serve_processes import replica, router_command, vllm_router

from sirllm_agents import Engine

SCRIPT = ["Hello, who are you?", "Tell me more.", "And then?", "Why?"]
LEASE_SECONDS = 3  # serve_processes.replica's


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> Engine:
    return Engine(tiny_model_dir)


def replies_of_one_session(engine: Engine, script: list[str]) -> list[str]:
    """The replies of one uninterrupted session to ``script`` (greedy, 8 tokens each)."""
    session, messages, replies = engine.session(), [], []
    for text in script:
        messages.append(user(text))
        reply = session.chat(messages, max_new_tokens=8)
        replies.append(reply.content)
        messages.append({"role": "assistant", "content": reply.content})
    return replies


@pytest.fixture(scope="module")
def expected(reference) -> list[str]:
    return replies_of_one_session(reference, SCRIPT)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def chat(url: str, messages: list[dict], session_id: str, **body) -> httpx.Response:
    body = {"model": "sirllm", "messages": messages, "max_tokens": 8, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"X-Session-Id": session_id}, timeout=120)


def chat_retrying_busy(url: str, messages: list[dict], session_id: str, patience: float = 20) -> httpx.Response:
    """As a client or router does with a 409: retry after its ``Retry-After`` until the lease is free."""
    deadline = time.monotonic() + patience
    while True:
        response = chat(url, messages, session_id)
        if response.status_code != 409 or time.monotonic() > deadline:
            return response
        time.sleep(int(response.headers["Retry-After"]))


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def streamed_text(line: str) -> str:
    """The text a server-sent event line carries ("" for any other line)."""
    if not line.startswith("data: {"):
        return ""
    choices = json.loads(line.removeprefix("data: ")).get("choices") or [{}]
    return choices[0].get("delta", {}).get("content") or ""


def test_a_replica_killed_mid_conversation_loses_no_acknowledged_turn(tiny_model_dir, redis, expected):
    session_id, messages = f"conv-{uuid.uuid4().hex[:8]}", []
    with replica(tiny_model_dir, redis.url, "a") as (a, process_a), replica(tiny_model_dir, redis.url, "b") as (b, _):
        for turn in range(2):
            messages.append(user(SCRIPT[turn]))
            response = chat(a, messages, session_id)
            assert response.headers["X-Replica"] == "a"
            messages.append({"role": "assistant", "content": content(response)})
            assert messages[-1]["content"] == expected[turn]
        prompt = response.json()["usage"]["prompt_tokens"]
        process_a.send_signal(signal.SIGKILL)  # no hand-over: a's lease lapses in Redis after LEASE_SECONDS
        process_a.wait(10)

        messages.append(user(SCRIPT[2]))
        started = time.monotonic()
        response = chat_retrying_busy(b, messages, session_id)
        assert response.headers["X-Replica"] == "b"
        assert content(response) == expected[2]  # as if a had never died
        assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > prompt  # from a's last commit
        assert time.monotonic() - started < LEASE_SECONDS + 3  # blocked only for the rest of a's lease
        messages.append({"role": "assistant", "content": content(response)})

        redis.restart()  # append-only file on: the session and b's lease survive
        messages.append(user(SCRIPT[3]))
        response = chat(b, messages, session_id)
        assert content(response) == expected[3]
        assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_a_replica_stopped_past_its_lease_has_its_commit_refused_and_never_answers_stale(
    tiny_model_dir, redis, expected
):
    session_id, messages = f"conv-{uuid.uuid4().hex[:8]}", [user(SCRIPT[0])]
    with replica(tiny_model_dir, redis.url, "a") as (a, process_a), replica(tiny_model_dir, redis.url, "b") as (b, _):
        messages.append({"role": "assistant", "content": content(chat(a, messages, session_id))})
        messages.append(user(SCRIPT[1]))

        # a is stopped in the middle of the next turn: after its first streamed token, before its commit.
        body = {"model": "sirllm", "messages": messages, "max_tokens": 400, "stream": True}
        with httpx.stream(
            "POST", f"{a}/v1/chat/completions", json=body, headers={"X-Session-Id": session_id}, timeout=120
        ) as stalled:
            lines, events = stalled.iter_lines(), []
            while not (events and streamed_text(events[-1])):
                events.append(next(lines))  # up to the first chunk that carries text (the role chunk has none)
            os.kill(process_a.pid, signal.SIGSTOP)  # 400 tokens take this model over a second: mid-decode
            time.sleep(LEASE_SECONDS + 1)

            taken = chat(b, messages, session_id)  # b takes the session over from a's last commit
            assert taken.headers["X-Replica"] == "b" and content(taken) == expected[1]
            os.kill(process_a.pid, signal.SIGCONT)
            events += [line for line in lines if line]

        # a finished decoding, but its commit was refused: no finish chunk, no [DONE]; the error instead.
        chunks = [json.loads(line.removeprefix("data: ")) for line in events if line.startswith("data: {")]
        assert not any(c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")), events[-3:]
        assert "data: [DONE]" not in events
        assert chunks[-1]["error"]["code"] == "session_busy" and "(b)" in chunks[-1]["error"]["message"]

        # Asked again, a does not answer from its stale copy: b holds the session.
        messages.append({"role": "assistant", "content": content(taken)})
        messages.append(user(SCRIPT[2]))
        refused = chat(a, messages, session_id)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "session_busy"
        assert httpx.get(f"{a}/health").json()["live_sessions"] == 0
        assert content(chat(b, messages, session_id)) == expected[2]


CONVERSATIONS, TURNS = 12, 10


def test_three_replicas_behind_vllm_router_give_every_conversation_a_single_process_replies(
    tiny_model_dir, redis, reference
):
    scripts = {
        f"user-{i}-{uuid.uuid4().hex[:6]}": [f"Hello from user {i}."] + [f"Go on, part {t}." for t in range(1, TURNS)]
        for i in range(CONVERSATIONS)
    }
    if router_command() is None:
        skip_or_fail("vllm-router is not installed (pip install vllm-router; CI installs it from requirements/ci.in)")
    expected = {session_id: replies_of_one_session(reference, script) for session_id, script in scripts.items()}
    with contextlib.ExitStack() as running:
        workers = [running.enter_context(replica(tiny_model_dir, redis.url, f"r{i}"))[0] for i in range(3)]
        front = running.enter_context(vllm_router(workers))
        models = httpx.get(f"{front}/v1/models", timeout=10).json()
        assert "sirllm" in [model["id"] for model in models["data"]]

        def converse(session_id: str) -> tuple[list[str], set[str]]:
            messages, replies, replicas = [], [], set()
            for text in scripts[session_id]:
                messages.append(user(text))
                response = chat(front, messages, session_id)
                replicas.add(response.headers["X-Replica"])
                replies.append(content(response))
                messages.append({"role": "assistant", "content": replies[-1]})
            return replies, replicas

        with ThreadPoolExecutor(len(scripts)) as pool:  # the conversations at once, each turn after the last
            outcomes = dict(zip(scripts, pool.map(converse, scripts)))
        placed = {}
        for session_id, (replies, replicas) in outcomes.items():
            assert replies == expected[session_id], session_id
            [placed[session_id]] = replicas  # every turn of a conversation on one replica
        assert len(set(placed.values())) >= 2  # and the conversations spread over the replicas

        session_id = next(iter(scripts))
        body = {"model": "sirllm", "messages": [user(scripts[session_id][0])], "max_tokens": 8, "stream": True}
        streamed = httpx.post(
            f"{front}/v1/chat/completions", json=body, headers={"X-Session-Id": session_id}, timeout=60
        )
        events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and streamed.headers["X-Replica"] == placed[session_id]


def test_a_replica_killed_behind_vllm_router_fails_over_with_no_acknowledged_turn_lost(tiny_model_dir, redis, expected):
    if router_command() is None:
        skip_or_fail("vllm-router is not installed (pip install vllm-router; CI installs it from requirements/ci.in)")
    session_id, messages = f"conv-{uuid.uuid4().hex[:8]}", []
    with contextlib.ExitStack() as running:
        replicas = {f"r{i}": running.enter_context(replica(tiny_model_dir, redis.url, f"r{i}")) for i in range(3)}
        # Health checked every second, dropped at the first failure: failover within seconds, not the default minute.
        checks = ("--health-check-interval-secs", "1", "--health-failure-threshold", "1")
        front = running.enter_context(vllm_router([url for url, _ in replicas.values()], *checks))
        for turn in range(2):
            messages.append(user(SCRIPT[turn]))
            response = chat(front, messages, session_id)
            messages.append({"role": "assistant", "content": content(response)})
            assert messages[-1]["content"] == expected[turn]
        serving = response.headers["X-Replica"]
        prompt = response.json()["usage"]["prompt_tokens"]
        _, victim = replicas[serving]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)

        # As a client does: retry what failed (the router's error while it still sends to the dead replica, a 409
        # while that replica's lease lapses) until the conversation is served again.
        messages.append(user(SCRIPT[2]))
        deadline, failures = time.monotonic() + 30, []
        while True:
            with contextlib.suppress(httpx.TransportError):
                response = chat(front, messages, session_id)
                if response.status_code == 200:
                    break
                failures.append(response.status_code)
            assert time.monotonic() < deadline, f"not served again within 30 s: {failures}"
            time.sleep(0.5)
        assert response.headers["X-Replica"] != serving
        assert content(response) == expected[2]  # as if the replica had never died
        assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > prompt  # from its last commit
        messages.append({"role": "assistant", "content": content(response)})
        messages.append(user(SCRIPT[3]))
        following = chat(front, messages, session_id)
        assert content(following) == expected[3] and following.headers["X-Replica"] == response.headers["X-Replica"]
