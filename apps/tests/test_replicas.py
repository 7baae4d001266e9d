"""Replicas: ``sirllm-agents serve --session-store DIR`` processes sharing one folder hand conversations to one another
with the same greedy replies, never serve one session at once, and sit behind the shipped nginx config."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra")
pytest.importorskip("uvicorn", reason="the server needs the serve extra")
openai = pytest.importorskip("openai", reason="the replica tests use the official client (the apps test extra)")

import httpx  # noqa: E402  (comes with openai)
from redis_fixtures import free_port  # noqa: E402
from serve_processes import replica, wait_until_up  # noqa: E402

from sirllm_agents import Engine  # noqa: E402

NGINX_CONF = Path(__file__).parents[1] / "sirllm_agents_apps" / "server" / "nginx.conf"


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> Engine:
    return Engine(tiny_model_dir)


def _chat(url: str, messages: list[dict], session_id: str) -> httpx.Response:
    body = {"model": "sirllm", "messages": messages, "max_tokens": 8}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"X-Session-Id": session_id}, timeout=120)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_two_replica_processes_hand_a_conversation_over_and_never_share_it(tiny_model_dir, reference, tmp_path):
    store = tmp_path / "store"
    session_id = f"conv-{uuid.uuid4().hex[:8]}"
    script = ["Hello, who are you?", "Tell me more.", "And then?"]
    expected, uninterrupted, messages = [], reference.session(), []
    for text in script:
        messages.append(_user(text))
        reply = uninterrupted.chat(messages, max_new_tokens=8)
        expected.append(reply.content)
        messages.append({"role": "assistant", "content": reply.content})

    messages = [_user(script[0])]
    replica_a = replica(tiny_model_dir, store, "a", "--handoff-idle", "600")
    with replica_a as (a, process_a), replica(tiny_model_dir, store, "b", "--handoff-idle", "1") as (b, _):
        first = _chat(a, messages, session_id)
        assert first.status_code == 200 and first.headers["X-Replica"] == "a"
        assert first.json()["choices"][0]["message"]["content"] == expected[0]
        messages += [first.json()["choices"][0]["message"], _user(script[1])]

        # b is asked while a holds the session: a clear refusal, and b does not serve it.
        busy = _chat(b, messages, session_id)
        assert busy.status_code == 409, busy.text
        error = busy.json()["error"]
        assert error["code"] == "session_busy" and "held by another server (a)" in error["message"]
        assert 1 <= int(busy.headers["Retry-After"]) <= 3  # the rest of a's lease
        assert httpx.get(f"{b}/health").json()["live_sessions"] == 0

        # a stops (SIGTERM): it saves its sessions to the store and gives their leases up; b continues.
        process_a.send_signal(signal.SIGTERM)
        assert process_a.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        second = _chat(b, messages, session_id)
        assert second.status_code == 200 and second.headers["X-Replica"] == "b"
        body = second.json()
        assert body["choices"][0]["message"]["content"] == expected[1]  # as if never interrupted
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > first.json()["usage"]["prompt_tokens"]
        messages += [body["choices"][0]["message"], _user(script[2])]

        # A new replica a2 asks while b holds it: the official client retries the 409 after its Retry-After,
        # by which time b, idle for a second, has handed the session to the store.
        with replica(tiny_model_dir, store, "a2") as (a2, _):
            client = openai.OpenAI(base_url=f"{a2}/v1", api_key="unused", max_retries=4)
            raw = client.chat.completions.with_raw_response.create(
                model="sirllm", messages=messages, max_tokens=8, extra_headers={"X-Session-Id": session_id}
            )
            assert raw.headers["X-Replica"] == "a2"
            third = raw.parse()
            assert third.choices[0].message.content == expected[2]
            assert third.usage.prompt_tokens_details.cached_tokens > body["usage"]["prompt_tokens"]
    leftovers = sorted(path.suffix for path in store.iterdir() if path.is_file())
    assert leftovers == [".safetensors"]  # one session, and every lease given up when the replicas stopped


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (apt-get install nginx)")
def test_the_shipped_nginx_config_keeps_each_session_on_onereplica(tiny_model_dir, tmp_path):
    store, front = tmp_path / "store", free_port()
    with replica(tiny_model_dir, store, "r1") as (r1, _), replica(tiny_model_dir, store, "r2") as (r2, _):
        config = NGINX_CONF.read_text()
        for port, url in (("8001", r1), ("8002", r2)):
            config = config.replace(f"127.0.0.1:{port};", f"{url.removeprefix('http://')};", 1)
            config = config.replace(f"127.0.0.1:{port} ", f"{url.removeprefix('http://')} ", 1)
        config = config.replace("listen 127.0.0.1:8000;", f"listen 127.0.0.1:{front};")
        assert r1.removeprefix("http://") in config and f":{front};" in config
        prefix = tmp_path / "nginx"
        (prefix / "logs").mkdir(parents=True)
        (prefix / "nginx.conf").write_text(config)
        globals_ = f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/logs/error.log;"
        nginx = subprocess.Popen(
            ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", globals_],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # nginx writes its errors to error_log
        )
        try:
            url = f"http://127.0.0.1:{front}"
            wait_until_up(url, nginx, timeout=20)
            placed: dict[str, str] = {}
            for i in range(12):
                session_id = f"user-{i}"
                messages = [_user(f"Hello from user {i}.")]
                replicas = set()
                for turn in range(2):
                    response = _chat(url, messages, session_id)
                    assert response.status_code == 200, response.text
                    replicas.add(response.headers["X-Replica"])
                    body = response.json()
                    assert turn == 0 or body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
                    messages += [body["choices"][0]["message"], _user("Go on.")]
                [placed[session_id]] = replicas  # every turn of a session on the same replica
            assert set(placed.values()) == {"r1", "r2"}  # and the sessions spread over both
            streamed = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "sirllm", "messages": [_user("Stream, please.")], "max_tokens": 8, "stream": True},
                headers={"X-Session-Id": "user-0"},
                timeout=60,
            )
            events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "chat.completion.chunk"
            assert streamed.headers["X-Replica"] == placed["user-0"]
        finally:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(20)
            except subprocess.TimeoutExpired:
                nginx.kill()
