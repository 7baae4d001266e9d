"""Replicas on Redis, as real processes: ``sirllm-agents serve --session-store redis://...`` servers sharing one
``redis-server``. A replica killed mid-conversation loses no acknowledged turn (the next turn, on another replica,
gives the uninterrupted reply); a replica stopped past its lease has its commit refused and never answers from its
stale copy; sessions survive a restart of Redis."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra")
pytest.importorskip("uvicorn", reason="the server needs the serve extra")

import httpx
from redis_fixtures import redis_server
from serve_processes import replica
from sirllm_fixtures import tiny_llama

from sirllm_agents import Engine

SCRIPT = ["Hello, who are you?", "Tell me more.", "And then?", "Why?"]
LEASE_SECONDS = 3  # serve_processes.replica's


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny random model as a folder, so that server processes and this one load the same weights."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def expected(model_dir) -> list[str]:
    """The replies of one uninterrupted session to SCRIPT (greedy, 8 tokens each)."""
    session, messages, replies = Engine(model_dir).session(), [], []
    for text in SCRIPT:
        messages.append(user(text))
        reply = session.chat(messages, max_new_tokens=8)
        replies.append(reply.content)
        messages.append({"role": "assistant", "content": reply.content})
    return replies


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


def test_a_replica_killed_mid_conversation_loses_no_acknowledged_turn(model_dir, redis, expected):
    session_id, messages = f"conv-{uuid.uuid4().hex[:8]}", []
    with replica(model_dir, redis.url, "a") as (a, process_a), replica(model_dir, redis.url, "b") as (b, _):
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


def test_a_replica_stopped_past_its_lease_has_its_commit_refused_and_never_answers_stale(model_dir, redis, expected):
    session_id, messages = f"conv-{uuid.uuid4().hex[:8]}", [user(SCRIPT[0])]
    with replica(model_dir, redis.url, "a") as (a, process_a), replica(model_dir, redis.url, "b") as (b, _):
        messages.append({"role": "assistant", "content": content(chat(a, messages, session_id))})
        messages.append(user(SCRIPT[1]))

        # a is stopped in the middle of the next turn: after its first streamed token, before its commit.
        body = {"model": "sirllm", "messages": messages, "max_tokens": 400, "stream": True}
        with httpx.stream(
            "POST", f"{a}/v1/chat/completions", json=body, headers={"X-Session-Id": session_id}, timeout=120
        ) as stalled:
            lines = stalled.iter_lines()
            events = [next(lines), next(lines)]  # the role, then the first token
            os.kill(process_a.pid, signal.SIGSTOP)
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
