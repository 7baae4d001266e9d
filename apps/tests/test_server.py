"""The OpenAI-compatible server (``sirllm-agents serve``), tested through live uvicorn servers on 127.0.0.1 with the
official ``openai`` client and raw HTTP, on a tiny random-weight engine (greedy replies are deterministic)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra")
pytest.importorskip("uvicorn", reason="the server needs the serve extra")
openai = pytest.importorskip("openai", reason="the server tests use the official client (the apps test extra)")

import httpx  # noqa: E402  (comes with openai)
import uvicorn  # noqa: E402
from sirllm_agents_apps.server import ServerSettings, create_app  # noqa: E402
from sirllm_fixtures import tiny_llama  # noqa: E402

from sirllm_agents import Engine, SessionConfig  # noqa: E402
from sirllm_agents.scheduler import DEFAULT_PARALLEL  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serving(app):
    """A uvicorn server for ``app`` in a thread, on a free port of 127.0.0.1; yields its base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def engine(tokenizer) -> Engine:
    return Engine(tiny_llama(tokenizer), tokenizer=tokenizer, max_live_sessions=64)


@pytest.fixture(scope="module")
def base_url(engine):
    with _serving(create_app(engine, ServerSettings(max_queue=8))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(engine) -> str:
    return engine.model.name


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _unique(text: str) -> str:
    """A first message no other test sends, so prefix routing starts a fresh session for it."""
    return f"{text} [{uuid.uuid4().hex[:8]}]"


def _post(base_url: str, body, **headers) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{base_url}/v1/chat/completions",
        content=content,
        headers={"Content-Type": "application/json", **headers},
        timeout=60,
    )


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


# -- the plain endpoints ----------------------------------------------------------------------------------------------


def test_models_health_and_metrics(base_url, client, model):
    assert [m.id for m in client.models.list().data] == [model, "sirllm"]
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["model"] == model
    client.chat.completions.create(model="sirllm", messages=[_user(_unique("hi"))], max_tokens=4)
    text = httpx.get(f"{base_url}/metrics").text
    for name in (
        "sessions_live",
        "sessions_spilled",
        "tokens_prefilled_total",
        "tokens_reused_total",
        "tokens_evicted_total",
        "tokens_generated_total",
        "request_latency_seconds_count",
        "scheduler_running",
        "scheduler_waiting",
    ):
        assert f"\nsirllm_{name} " in text or text.startswith(f"# HELP sirllm_{name} ")
    assert 'sirllm_requests_total{endpoint="/v1/chat/completions",code="200"}' in text
    figures = dict(line.split() for line in text.splitlines() if line and not line.startswith("#") and "{" not in line)
    assert int(figures["sirllm_tokens_generated_total"]) >= 4
    # A reply of 4 tokens takes at least 4 forwards, each in a call of its own or shared with another conversation.
    assert int(figures["sirllm_scheduler_forwards_total"]) >= int(figures["sirllm_scheduler_calls_total"]) >= 4


# -- replies ----------------------------------------------------------------------------------------------------------


def test_content_parts_and_the_developer_role_are_read(client, model, engine):
    opening = _unique("Parts")
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": opening}, {"type": "text", "text": " joined"}]},
    ]
    completion = client.chat.completions.create(model=model, messages=messages, max_tokens=6)
    plain = [{"role": "system", "content": "Be brief."}, _user(opening + " joined")]
    assert completion.choices[0].message.content == engine.session().chat(plain, max_new_tokens=6).content


def test_a_plain_reply_in_openai_format(client, model, engine):
    messages = [_user(_unique("Tell me about the sea."))]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=12)
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == model
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content and choice.message.tool_calls is None
    reference = engine.session().chat(messages, max_new_tokens=12)  # the core, on a session of its own
    assert choice.message.content == reference.content
    usage = completion.usage
    assert usage.prompt_tokens == reference.stats.input_tokens and usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + 12 and usage.prompt_tokens_details.cached_tokens == 0
    assert raw.headers["X-Session-Id"] in engine.pool.live_ids()


def test_streamed_deltas_join_to_the_plain_reply(client, model):
    messages = [_user(_unique("Write a line about rivers."))]
    plain = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, extra_headers={"X-Session-Id": uuid.uuid4().hex}
    )
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Session-Id": uuid.uuid4().hex},
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content
    finals = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_the_async_client_plain_and_streamed(base_url, model):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        messages = [_user(_unique("Async hello"))]
        plain = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=10, extra_headers={"X-Session-Id": uuid.uuid4().hex}
        )
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=10,
            stream=True,
            extra_headers={"X-Session-Id": uuid.uuid4().hex},
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        await client.close()
        return plain.choices[0].message.content, "".join(pieces)

    plain, streamed = asyncio.run(run())
    assert plain and streamed == plain


def test_a_required_tool_call_and_the_loop_continuing_its_session(client, model, engine):
    messages = [_user(_unique("What is the weather in Oslo?"))]
    first = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=60
    )
    completion = first.parse()
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls" and message.content is None
    [call] = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)  # a JSON string, as in OpenAI's API
    assert isinstance(arguments["city"], str)

    # The client sends the call back as it came (arguments as a JSON string) with the tool's result.
    messages += [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 12}'},
    ]
    second = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, tools=[WEATHER], max_tokens=8
    )
    assert second.headers["X-Session-Id"] == first.headers["X-Session-Id"]  # routed by prefix to the same session
    cached = second.parse().usage.prompt_tokens_details.cached_tokens

    # What the core reuses over the same two calls.
    session = engine.session()
    reply = session.chat(messages[:1], tools=[WEATHER], tool_choice="required", max_new_tokens=60)
    assert reply.tool_calls[0].arguments == arguments
    tool_message = {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": '{"temperature": 12}'}
    again = session.chat([messages[0], reply.as_message(), tool_message], tools=[WEATHER], max_new_tokens=8)
    assert cached > 0 and cached == again.stats.reused_tokens


def test_named_tool_choice_streams_a_structured_call(client, model):
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[_user(_unique("Oslo weather, please"))],
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=60,
            stream=True,
        )
    )
    calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert [(call.index, call.function.name) for call in calls] == [(0, "get_weather")] and calls[0].id
    assert "city" in json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_response_format_json_schema_and_json_object(client, model):
    completion = client.chat.completions.create(
        model=model,
        messages=[_user(_unique("Describe a person."))],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        max_tokens=60,
    )
    person = json.loads(completion.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and len(person["name"]) <= 8
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 150
    completion = client.chat.completions.create(
        model=model,
        messages=[_user(_unique("Any JSON object."))],
        response_format={"type": "json_object"},
        max_tokens=60,
    )
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(completion.choices[0].message.content), dict)
    else:  # cut off by max_tokens: still the start of an object
        assert completion.choices[0].message.content.lstrip().startswith("{")


def test_a_structured_output_loop_continues_the_session_it_names(base_url, model):
    session_id = uuid.uuid4().hex
    messages = [_user("Give me JSON.")]
    body = {"model": model, "response_format": {"type": "json_object"}, "max_tokens": 20}
    first = _post(base_url, {**body, "messages": messages}, **{"X-Session-Id": session_id}).json()
    messages += [first["choices"][0]["message"], _user("Another.")]
    second = _post(base_url, {**body, "messages": messages}, **{"X-Session-Id": session_id}).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens"]


def test_a_structured_output_loop_without_a_session_id_finds_its_session(base_url, model):
    messages = [_user(_unique("Give me JSON."))]
    body = {"model": model, "response_format": {"type": "json_object"}, "max_tokens": 20}
    first = _post(base_url, {**body, "messages": messages})
    messages += [first.json()["choices"][0]["message"], _user("Another.")]
    second = _post(base_url, {**body, "messages": messages})
    assert second.headers["X-Session-Id"] == first.headers["X-Session-Id"]  # routed by prefix, as held
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > first.json()["usage"]["prompt_tokens"]


def test_cached_tokens_grow_over_a_five_step_loop(client, model, engine):
    messages, cached, reused = [], [], []
    session = engine.session()
    for step in range(5):
        messages.append(_user(_unique(f"Step {step}: go on.") if step == 0 else f"Step {step}: go on."))
        completion = client.chat.completions.create(model=model, messages=messages, max_tokens=8, stop=["\n\n"])
        cached.append(completion.usage.prompt_tokens_details.cached_tokens)
        reused.append(session.chat(messages, max_new_tokens=8, stop=["\n\n"]).stats.reused_tokens)
        messages.append({"role": "assistant", "content": completion.choices[0].message.content})
    assert cached == reused
    assert cached[0] == 0 and all(a < b for a, b in itertools.pairwise(cached))


def test_x_session_id_names_the_session(base_url, model, engine):
    session_id = f"user-{uuid.uuid4().hex[:8]}"
    body = {"model": model, "messages": [_user("Hello, named session")], "max_tokens": 4}
    response = _post(base_url, body, **{"X-Session-Id": session_id})
    assert response.status_code == 200 and response.headers["X-Session-Id"] == session_id
    assert session_id in engine.pool.live_ids()
    body["messages"] += [response.json()["choices"][0]["message"], _user("And again")]
    again = _post(base_url, body, **{"X-Session-Id": session_id})
    assert again.headers["X-Session-Id"] == session_id
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_four_concurrent_clients_get_the_serial_replies(client, model):
    openings = [_unique(f"Conversation {i} begins.") for i in range(4)]

    def converse(i: int, named: bool) -> tuple[list[str], list[str]]:
        messages, replies, sessions = [_user(openings[i])], [], []
        headers = {"X-Session-Id": uuid.uuid4().hex} if named else {}
        for turn in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=messages, max_tokens=12, extra_headers=headers
            )
            content = raw.parse().choices[0].message.content
            replies.append(content)
            sessions.append(raw.headers["X-Session-Id"])
            messages += [{"role": "assistant", "content": content}, _user(f"Turn {turn + 1}.")]
        return replies, sessions

    serial = [converse(i, named=True)[0] for i in range(4)]
    results: dict[int, tuple[list[str], list[str]]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, converse(i, named=False))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results[i][0] for i in range(4)] == serial
    sessions = [results[i][1] for i in range(4)]
    assert all(a == b for a, b in sessions) and len({a for a, _ in sessions}) == 4  # routed by prefix, one each


def test_a_client_leaving_mid_stream_rolls_the_reply_back(base_url, client, model, engine):
    messages = [_user(_unique("A long story, please."))]
    session_id = uuid.uuid4().hex
    body = {"model": model, "messages": messages, "max_tokens": 200, "stream": True}
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=body, headers={"X-Session-Id": session_id}, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                break  # the first piece of content: hang up
    # The next identical request waits for the session, then finds the prompt rolled back to: reused, and the
    # full greedy reply follows.
    retry = client.chat.completions.create(
        model=model, messages=messages, max_tokens=200, extra_headers={"X-Session-Id": session_id}
    )
    # The core, the same way: a stream abandoned after its first event, then the same messages again.
    session = engine.session()
    abandoned = session.stream(messages, max_new_tokens=200)
    next(abandoned)
    abandoned.close()
    reference = session.chat(messages, max_new_tokens=200)
    assert retry.choices[0].message.content == reference.content
    assert retry.usage.completion_tokens == 200
    # Had the partial reply stayed, these messages would not extend the session's transcript: nothing reused.
    assert retry.usage.prompt_tokens_details.cached_tokens == reference.stats.reused_tokens > 0


# -- faults -----------------------------------------------------------------------------------------------------------


def test_bad_requests_are_answered_in_openai_format_and_the_server_keeps_serving(base_url, client, model, engine):
    error = _error(_post(base_url, b'{"model": "sirllm", "messages": ['), 400)
    assert "JSON" in error["message"]
    error = _error(_post(base_url, {"model": model, "messages": [{"role": "wizard", "content": "hi"}]}), 400)
    assert "unknown role 'wizard'" in error["message"]  # the core's own message
    error = _error(_post(base_url, {"model": model, "messages": [_user("hi")], "n": 2}), 400)
    assert error["param"] == "n" and "n=2" in error["message"]
    error = _error(_post(base_url, {"model": model, "messages": []}), 400)
    assert error["param"] == "messages"
    error = _error(_post(base_url, {"model": model, "messages": [_user("hi")], "max_tokens": 0}), 400)
    assert error["param"] == "max_tokens"
    error = _error(_post(base_url, {"model": model, "messages": [_user("hi")], "tool_choice": "required"}), 400)
    assert "needs tools" in error["message"]
    before = set(engine.pool.live_ids())
    body = {
        "model": model,
        "messages": [_user(_unique("hi"))],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "nope"}},
    }
    error = _error(_post(base_url, body), 400)
    assert "'nope'" in error["message"] and set(engine.pool.live_ids()) == before  # no empty session left behind
    error = _error(_post(base_url, {"model": "gpt-4o", "messages": [_user("hi")]}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[_user("hi")])
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "hi"}])
    error = _error(_post(base_url, {"model": model, "messages": [_user("hi")], "stream": True, "stop": [""]}), 400)
    assert "stop" in error["message"]  # a stream refused before it starts: a plain 400
    assert httpx.get(f"{base_url}/v1/nowhere").status_code == 404
    assert client.chat.completions.create(model=model, messages=[_user("still here")], max_tokens=2).choices


def test_keys_body_size_and_overload(engine, model):
    app = create_app(engine, ServerSettings(api_key=KEY, max_queue=1, max_body_bytes=4096))
    with _serving(app) as url:
        body = {"model": model, "messages": [_user(_unique("keyed"))], "max_tokens": 2}
        error = _error(_post(url, body), 401)
        assert error["code"] == "invalid_api_key"
        _error(_post(url, body, Authorization="Bearer wrong"), 401)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # open, for load balancers
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert keyed.chat.completions.create(**body).choices

        big = {"model": model, "messages": [_user("x" * 5000)]}
        error = _error(_post(url, big, Authorization=f"Bearer {KEY}"), 413)
        assert "4096" in error["message"]

        # One request held in flight (its routing blocked) fills the queue: the next is refused with 429.
        gate, entered = threading.Event(), threading.Event()
        route = engine.route

        def held_route(*args, **kwargs):
            entered.set()
            gate.wait(30)
            return route(*args, **kwargs)

        engine.route = held_route
        try:
            held = threading.Thread(target=lambda: keyed.chat.completions.create(**body))
            held.start()
            assert entered.wait(30)
            response = _post(url, body, Authorization=f"Bearer {KEY}")
            error = _error(response, 429)
            assert response.headers["Retry-After"] == "1" and error["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                keyed.chat.completions.create(**body)
        finally:
            gate.set()
            del engine.route
        held.join(30)
        assert keyed.chat.completions.create(**body).choices  # served again once the queue has room


# -- the command ------------------------------------------------------------------------------------------------------


def test_serve_builds_the_engine_warns_off_loopback_and_runs_uvicorn(monkeypatch, capsys, request, engine):
    import gc
    import logging

    from sirllm_agents_apps.cli import main

    import sirllm_agents

    made, ran = {}, {}

    def fake_engine(model, backend, parallel, batch, config, max_live_sessions, store):
        made.update(model=model, backend=backend, config=config, max_live_sessions=max_live_sessions, store=store)
        made["parallel"] = parallel
        return engine

    monkeypatch.setattr(sirllm_agents, "Engine", fake_engine)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: ran.update(app=app, host=host, port=port, **kw))
    frozen = []  # the heap the model left is frozen once, after loading and before serving
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(("model" in made, "app" in ran)))
    # `serve` gives the request log a handler on this test's captured stderr: taken back afterwards, so that later
    # tests' servers neither write to the closed capture nor lose their records to it.
    request_log = logging.getLogger("sirllm_agents.server")
    monkeypatch.setattr(request_log, "handlers", [])
    monkeypatch.setattr(request_log, "propagate", request_log.propagate)
    level = request_log.level
    request.addfinalizer(lambda: request_log.setLevel(level))
    main(["serve", "--cache-size", "256", "--policy", "streaming", "--max-live-sessions", "3", "--parallel", "2"])
    assert frozen == [(True, False)]
    assert made["config"].cache_size == 256 and made["config"].policy == "streaming" and made["max_live_sessions"] == 3
    assert made["parallel"] == 2
    assert made["store"] is None  # a private spill folder unless --session-store names a shared one
    assert made["backend"] == "auto"
    assert ran["access_log"] is False  # the server's own line per request replaces uvicorn's
    assert ran["host"] == "127.0.0.1" and ran["port"] == 8000
    assert "warning" not in capsys.readouterr().err
    main(["serve", "--host", "0.0.0.0", "--port", "9001"])
    assert "warning" in capsys.readouterr().err and ran["host"] == "0.0.0.0"
    assert made["config"] == SessionConfig()  # the options left out keep the core's defaults
    assert made["parallel"] == DEFAULT_PARALLEL
    main(["serve", "--host", "0.0.0.0", "--api-key", KEY])
    assert "warning" not in capsys.readouterr().err


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from sirllm_agents_apps.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["serve"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "fastapi" in line and 'pip install "sirllm-agents-apps[serve]"' in line


# -- a framework's OpenAI client --------------------------------------------------------------------------------------


def test_langchain_chat_openai_30_step_tool_loop_reuses_the_history_each_step(base_url, model, engine):
    langchain_openai = pytest.importorskip("langchain_openai", reason="pip install langchain-openai")
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = langchain_openai.ChatOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", model=model, temperature=0, max_tokens=40, max_retries=0
    )
    agent = llm.bind_tools([WEATHER], tool_choice="required")
    messages = [HumanMessage(_unique("Check the weather in a few cities."))]
    sessions_before = set(engine.pool.live_ids())
    prompts, cache_reads = [], []
    for step in range(30):
        reply = agent.invoke(messages)
        [call] = reply.tool_calls
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
        prompts.append(reply.usage_metadata["input_tokens"])
        cache_reads.append(reply.usage_metadata["input_token_details"]["cache_read"])
        messages += [reply, ToolMessage(f"{10 + step} degrees", tool_call_id=call["id"])]
    assert cache_reads[0] == 0
    # Each step reuses the whole previous prompt and the call it got back; only the tool's result and the next
    # assistant header are prefilled (a few tokens, not the growing history).
    for step in range(1, 30):
        assert prompts[step - 1] < cache_reads[step] < prompts[step], step
        assert prompts[step] - cache_reads[step] <= 20, (step, prompts[step], cache_reads[step])
    assert len(set(engine.pool.live_ids()) - sessions_before) == 1  # the whole loop on one session

    messages.append(HumanMessage("Thanks."))
    plain = llm.invoke(messages, max_tokens=8)
    streamed = "".join(chunk.content for chunk in llm.stream(messages, max_tokens=8))
    assert plain.content and streamed == plain.content


def test_llama_index_openai_like_chat_stream_and_async(base_url, model, engine):
    openai_like = pytest.importorskip("llama_index.llms.openai_like", reason="pip install llama-index-llms-openai-like")
    from llama_index.core.llms import ChatMessage

    llm = openai_like.OpenAILike(
        api_base=f"{base_url}/v1",
        api_key="unused",
        model=model,
        is_chat_model=True,
        is_function_calling_model=True,
        temperature=0,
        max_tokens=10,
        max_retries=0,
    )
    opening = _unique("Say something about trees.")
    messages = [ChatMessage(role="user", content=opening)]
    first = llm.chat(messages)
    reference = engine.session()
    expected = reference.chat([_user(opening)], max_new_tokens=10)
    assert first.message.content == expected.content
    assert first.raw.usage.prompt_tokens_details.cached_tokens == 0

    # The next turn continues the same session: its history comes from the cache.
    messages += [first.message, ChatMessage(role="user", content="And about rivers?")]
    streamed = list(llm.stream_chat(messages))
    again = reference.chat(
        [_user(opening), {"role": "assistant", "content": expected.content}, _user("And about rivers?")],
        max_new_tokens=10,
    )
    assert streamed[-1].message.content == again.content
    assert (
        asyncio.run(llm.acomplete("Name a colour.")).text
        == engine.session().chat([_user("Name a colour.")], max_new_tokens=10).content
    )

    # A tool call through LlamaIndex's function-calling path comes back structured.
    from llama_index.core.tools import FunctionTool
    from pydantic import BaseModel, Field

    class City(BaseModel):
        city: str = Field(max_length=10)  # a bound the random model's string needs to close

    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"12 degrees in {city}"

    tool = FunctionTool.from_defaults(fn=get_weather, fn_schema=City)
    llm.max_tokens = 60  # room for the whole call
    response = llm.chat_with_tools([tool], user_msg=_unique("Weather in Oslo?"), tool_required=True)
    [selection] = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert selection.tool_name == "get_weather" and isinstance(selection.tool_kwargs["city"], str)


def test_eight_clients_driving_four_conversations_get_the_serial_replies(base_url, model):
    """Two clients per conversation take its turns in alternation, four conversations at once, routed by prefix (no
    session header): every conversation's greedy replies equal a serial run's, and each turn after the first reuses the
    history the other client's turn left in the cache."""
    turns = 6
    openings = [_unique(f"Conversation {i} begins.") for i in range(4)]

    def turn_text(turn: int) -> str:
        return f"Turn {turn}: tell me more."

    def serial(i: int) -> list[str]:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        messages, replies = [_user(openings[i])], []
        headers = {"X-Session-Id": uuid.uuid4().hex}  # a session of its own, apart from the concurrent run's
        for turn in range(turns):
            if turn:
                messages.append(_user(turn_text(turn)))
            content = (
                client.chat.completions.create(model=model, messages=messages, max_tokens=8, extra_headers=headers)
                .choices[0]
                .message.content
            )
            replies.append(content)
            messages.append({"role": "assistant", "content": content})
        return replies

    expected = [serial(i) for i in range(4)]

    conversations = [{"messages": [_user(openings[i])], "replies": [], "cached": [], "sessions": []} for i in range(4)]
    conditions = [threading.Condition() for _ in range(4)]
    failures: list[BaseException] = []

    def client_loop(i: int, parity: int) -> None:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)  # one client each
        conversation, condition = conversations[i], conditions[i]
        try:
            for turn in range(parity, turns, 2):
                with condition:
                    assert condition.wait_for(lambda turn=turn: len(conversation["replies"]) == turn, timeout=120)
                    messages = list(conversation["messages"])
                if turn:
                    messages.append(_user(turn_text(turn)))
                raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8)
                completion = raw.parse()
                content = completion.choices[0].message.content
                with condition:
                    conversation["messages"] = [*messages, {"role": "assistant", "content": content}]
                    conversation["replies"].append(content)
                    conversation["cached"].append(completion.usage.prompt_tokens_details.cached_tokens)
                    conversation["sessions"].append(raw.headers["X-Session-Id"])
                    condition.notify_all()
        except BaseException as error:  # reported by the test's assertion below
            failures.append(error)
            with condition:
                conversation["replies"].append(None)  # lets the other client stop waiting
                condition.notify_all()

    threads = [threading.Thread(target=client_loop, args=(i, parity)) for i in range(4) for parity in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not failures, failures
    assert [c["replies"] for c in conversations] == expected
    for conversation in conversations:
        assert conversation["cached"][0] == 0 and all(cached > 0 for cached in conversation["cached"][1:])
        assert len(set(conversation["sessions"])) == 1
    assert len({c["sessions"][0] for c in conversations}) == 4


# -- the load benchmark -----------------------------------------------------------------------------------------------


def test_the_load_benchmark_compares_stateful_and_stateless_runs(base_url):
    from sirllm_agents_apps.bench import serve_load

    assert serve_load.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5 and serve_load.percentile([1.0, 2.0], 0.95) == 1.95
    results = serve_load.run(conversations=2, turns=3, max_tokens=4, url=base_url)
    stateful, stateless = results["modes"]
    assert (stateful["mode"], stateless["mode"]) == ("stateful", "stateless")
    for mode in (stateful, stateless):
        assert mode["requests"] == 6 and mode["latency_p50"] <= mode["latency_p95"]
        assert [(r["conversation"], r["turn"]) for r in mode["per_request"]] == [
            (c, t) for c in (0, 1) for t in (0, 1, 2)
        ]
    # The same greedy conversations both ways: equal prompts; only the stateful run reuses them.
    assert [r["prompt_tokens"] for r in stateful["per_request"]] == [
        r["prompt_tokens"] for r in stateless["per_request"]
    ]
    assert stateless["cached_tokens"] == 0
    assert all((r["cached_tokens"] > 0) == (r["turn"] > 0) for r in stateful["per_request"])
    assert "| stateful | 6 |" in serve_load.table(results)


def test_repetition_penalties_openai_and_llama_cpp_names(base_url, client, model, engine):
    question = [_user("Say something.")]
    penalised = engine.session().chat(question, max_new_tokens=24, repeat_penalty=0.2, repeat_last_n=-1)
    plain = engine.session().chat(question, max_new_tokens=24)
    assert penalised.content != plain.content
    body = {"model": model, "messages": [_user(_unique("x"))], "max_tokens": 24}
    reply = _post(base_url, {**body, "messages": question, "repeat_penalty": 0.2, "repeat_last_n": -1})
    assert reply.json()["choices"][0]["message"]["content"] == penalised.content
    answer = client.chat.completions.create(
        model=model, messages=[_user(_unique("y"))], max_tokens=4, frequency_penalty=0.5, presence_penalty=0.5
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    error = _error(_post(base_url, {**body, "frequency_penalty": 2.5}), 400)
    assert error["param"] == "frequency_penalty"
    error = _error(_post(base_url, {**body, "dry_sequence_breakers": ["\n", ""]}), 400)
    assert "dry_sequence_breakers must be a list of non-empty strings" in error["message"]


def test_a_json_reply_is_closed_within_max_tokens_or_comes_back_cut_with_length(client, model):
    joke = {
        "type": "object",
        "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}},
        "required": ["setup", "punchline"],
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "joke", "schema": joke}}
    closed = client.chat.completions.create(
        model=model, messages=[_user(_unique("A joke."))], response_format=response_format, max_tokens=30
    )
    assert closed.choices[0].finish_reason == "stop"
    assert set(json.loads(closed.choices[0].message.content)) == {"setup", "punchline"}
    cut = client.chat.completions.create(
        model=model, messages=[_user(_unique("A joke."))], response_format=response_format, max_tokens=4
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content.startswith("{") and cut.usage.completion_tokens == 4
    with pytest.raises(ValueError):
        json.loads(cut.choices[0].message.content)


# -- production: response models, the error mapping, request ids, latency metrics, disconnects ------------------------


def _figures(text: str) -> dict[str, float]:
    """The samples of a Prometheus text page, by their full name (labels included)."""
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    }


def test_the_response_models_write_openai_s_bodies():
    from sirllm_agents_apps.server.schemas import ChatCompletion, ChatCompletionChunk, ChunkChoice, Delta

    from sirllm_agents import Reply, ToolCall, ToolCallDelta, TurnStats

    stats = TurnStats(input_tokens=10, reused_tokens=4, generated_tokens=3)
    plain = Reply(content="Hi", tool_calls=[], finish_reason="stop", text="Hi", token_ids=[1, 2, 3], stats=stats)
    body = json.loads(ChatCompletion.of(plain, "chatcmpl-1", 7, "m").model_dump_json())
    assert body == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 7,
        "model": "m",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi", "refusal": None},  # no tool_calls key
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 3,
            "total_tokens": 13,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }
    call = ToolCall(id="call_1", name="get_weather", arguments={"city": "Oslo ø"})
    calling = Reply(content="", tool_calls=[call], finish_reason="tool_calls", text="", token_ids=[], stats=stats)
    message = json.loads(ChatCompletion.of(calling, "c", 0, "m").model_dump_json())["choices"][0]["message"]
    assert message["content"] is None  # null beside tool calls when empty
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo ø"}'}}
    ]
    chunk = ChatCompletionChunk(id="c", created=0, model="m", choices=[ChunkChoice(delta=Delta(content="x"))])
    assert "usage" not in json.loads(chunk.sse(include_usage=False)[len("data: ") :])
    assert json.loads(chunk.sse(include_usage=True)[len("data: ") :])["usage"] is None
    piece = Delta.of(ToolCallDelta(index=0, id="call_1", name="f", arguments="{}")).model_dump(mode="json")
    assert piece == {
        "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    }


def test_one_mapping_answers_every_kind_of_error(caplog):
    from pydantic import ValidationError
    from sirllm_agents_apps.server.errors import APIError, api_error
    from sirllm_agents_apps.server.schemas import ChatCompletionRequest

    from sirllm_agents import ContextOverflowError, EngineBusyError, SessionBusyError, SessionStoreUnavailable

    refused = api_error(ValueError("messages[0]: unknown role 'wizard'"), "r1")
    assert (refused.status, refused.code, refused.message) == (
        400,
        "invalid_value",
        "messages[0]: unknown role 'wizard'",
    )
    overflow = api_error(ContextOverflowError("too long"), "r1")
    assert (overflow.status, overflow.code, overflow.param) == (400, "context_length_exceeded", "messages")
    busy = api_error(SessionBusyError("s", "replica-b", 2.2), "r1")
    assert (busy.status, busy.code, busy.headers) == (409, "session_busy", {"Retry-After": "3"})
    engine_busy = api_error(EngineBusyError("the model is busy"), "r1", retry_after=5)
    assert (engine_busy.status, engine_busy.type, engine_busy.headers) == (
        429,
        "rate_limit_error",
        {"Retry-After": "5"},
    )
    with pytest.raises(ValidationError) as invalid:
        ChatCompletionRequest.model_validate_json(b'{"model": "m", "messages": [], "max_tokens": 2}')
    assert (api_error(invalid.value, "r1").status, api_error(invalid.value, "r1").param) == (400, "messages")
    with pytest.raises(ValidationError) as not_json:
        ChatCompletionRequest.model_validate_json(b'{"model": "m", "messa')
    assert api_error(not_json.value, "r1").code == "invalid_json"
    given = APIError(404, "no such model")
    assert api_error(given, "r1") is given

    with caplog.at_level(logging.ERROR, logger="sirllm_agents.server"):
        try:
            raise KeyError("the secret internals")
        except KeyError as error:
            internal = api_error(error, "req-42")
    assert (internal.status, internal.type, internal.code) == (500, "server_error", "internal_error")
    assert "internal error" in internal.message and "req-42" in internal.message and "secret" not in internal.message
    [logged] = [r for r in caplog.records if r.name == "sirllm_agents.server"]
    assert logged.exc_info is not None and "the secret internals" in str(logged.exc_info[1])
    body = internal.body("req-42").model_dump(mode="json")
    assert body["request_id"] == "req-42" and set(body["error"]) == {"message", "type", "param", "code"}

    # A session store that cannot be reached: a 503 to retry, its message said to the client and logged.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="sirllm_agents.server"):
        down = api_error(SessionStoreUnavailable("could not commit ...; the turn was not acknowledged"), "r2", 4)
    assert (down.status, down.code, down.headers) == (503, "session_store_unavailable", {"Retry-After": "4"})
    assert down.message == "could not commit ...; the turn was not acknowledged"
    logged = [r.getMessage() for r in caplog.records if r.name == "sirllm_agents.server"]
    assert logged == ["request r2: could not commit ...; the turn was not acknowledged"]


class _ScriptedStream:
    """Stands in for ``engine.astream``'s stream: yields ``events``, then raises ``error``."""

    def __init__(self, events, error: BaseException):
        self.events, self.error, self.reply, self.closed = list(events), error, None, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.events:
            return self.events.pop(0)
        raise self.error

    async def finish(self):
        async for _ in self:
            pass

    async def aclose(self):
        self.closed = True


def test_failures_answer_through_the_mapping_on_every_path(engine, model, monkeypatch, caplog):
    from sirllm_agents import EngineBusyError, SessionBusyError, TextDelta

    caplog.set_level(logging.INFO, logger="sirllm_agents.server")
    body = {"model": model, "messages": [_user(_unique("fail"))], "max_tokens": 4}
    with _serving(create_app(engine, ServerSettings(retry_after_seconds=3))) as url:
        # While routing: an unexpected exception is a 500 without its text, logged with its traceback.
        def broken_route(*args, **kwargs):
            raise RuntimeError("the secret internals")

        monkeypatch.setattr(engine, "route", broken_route)
        response = _post(url, body, **{"X-Request-Id": "trace-me-1"})
        error = _error(response, 500)
        assert response.headers["X-Request-Id"] == "trace-me-1" == response.json()["request_id"]
        assert "internal error" in error["message"] and "trace-me-1" in error["message"]
        assert "secret" not in response.text
        failures = [r for r in caplog.records if r.exc_info and "the secret internals" in str(r.exc_info[1])]
        assert len(failures) == 1 and failures[0].name == "sirllm_agents.server"

        def busy_route(*args, **kwargs):
            raise EngineBusyError("the model is busy: 4 running, 8 waiting")

        monkeypatch.setattr(engine, "route", busy_route)
        response = _post(url, body)
        assert _error(response, 429)["code"] == "rate_limit_exceeded" and response.headers["Retry-After"] == "3"
        monkeypatch.undo()

        # At a stream's first event: a plain status, before any byte of the stream.
        stream = _ScriptedStream([], SessionBusyError("s", "b", 1.5))
        monkeypatch.setattr(engine, "astream", lambda *args, **kwargs: stream)
        response = _post(url, {**body, "stream": True})
        assert _error(response, 409)["code"] == "session_busy" and response.headers["Retry-After"] == "2"
        assert stream.closed

        # Inside a stream's body: the error is its last event, and the request is counted with its status.
        stream = _ScriptedStream([TextDelta("Hel"), TextDelta("lo")], RuntimeError("the secret internals"))
        monkeypatch.setattr(engine, "astream", lambda *args, **kwargs: stream)
        response = _post(url, {**body, "stream": True})
        assert response.status_code == 200
        events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        assert "[DONE]" not in events
        last = json.loads(events[-1])
        assert last["error"]["code"] == "internal_error" and last["request_id"] == response.headers["X-Request-Id"]
        assert "secret" not in response.text
        # The stream is closed once the response has gone, so possibly just after the client read its end.
        _wait_for(lambda: stream.closed, "the failed stream was never closed")
        monkeypatch.undo()

        def metrics() -> dict[str, float]:
            return _figures(httpx.get(f"{url}/metrics").text)

        # Every failure gave its place in the queue back (the streamed one as its response ended).
        _wait_for(lambda: metrics()["sirllm_requests_in_flight"] == 0, "a failed request kept its place")
        figures = metrics()
        for code in (500, 429, 409):
            chat = f'sirllm_requests_total{{endpoint="/v1/chat/completions",code="{code}"}}'
            assert figures[chat] == (2 if code == 500 else 1), code
        assert _post(url, body).status_code == 200  # and the server goes on serving


def test_request_ids_and_one_log_line_per_request(base_url, model, caplog):
    caplog.set_level(logging.INFO, logger="sirllm_agents.server")
    body = {"model": model, "messages": [_user(_unique("ids"))], "max_tokens": 3}
    mine = _post(base_url, body, **{"X-Request-Id": "client-id-7"})
    assert mine.status_code == 200 and mine.headers["X-Request-Id"] == "client-id-7"
    made = _post(base_url, body)
    assert made.headers["X-Request-Id"].startswith("req_") and made.headers["X-Request-Id"] != "client-id-7"
    for unfit in ("x" * 129, "has space", "tab\there"):
        assert _post(base_url, {**body, "max_tokens": 0}, **{"X-Request-Id": unfit}).headers["X-Request-Id"] != unfit
    refused = _post(base_url, {**body, "max_tokens": 0}, **{"X-Request-Id": "bad-1"})
    assert refused.headers["X-Request-Id"] == "bad-1" == refused.json()["request_id"]
    assert httpx.get(f"{base_url}/health", headers={"X-Request-Id": "probe-1"}).headers["X-Request-Id"] == "probe-1"
    assert httpx.get(f"{base_url}/v1/nowhere").headers["X-Request-Id"].startswith("req_")

    deadline = time.monotonic() + 10  # the line is written once the response has gone
    while time.monotonic() < deadline and not any("probe-1" in r.getMessage() for r in caplog.records):
        time.sleep(0.01)
    lines = {r.request_id: r.getMessage() for r in caplog.records if r.name == "sirllm_agents.server"}
    usage = mine.json()["usage"]
    line = lines["client-id-7"]
    assert line.startswith("POST /v1/chat/completions status=200 ")
    assert f"session={mine.headers['X-Session-Id']} " in line
    assert f"prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']} " in line
    assert " ttft=0." in line and " seconds=" in line and line.endswith("request_id=client-id-7")
    assert lines["bad-1"].startswith("POST /v1/chat/completions status=400 session=- prompt_tokens=- ")
    assert lines["probe-1"].startswith("GET /health status=200 ")
    assert sum(1 for r in caplog.records if getattr(r, "request_id", None) == "client-id-7") == 1


def test_time_to_first_token_and_per_token_histograms(engine, model):
    with _serving(create_app(engine)) as url:
        reply = _post(url, {"model": model, "messages": [_user(_unique("histograms"))], "max_tokens": 6}).json()
        text = httpx.get(f"{url}/metrics").text
    tokens = reply["usage"]["completion_tokens"]
    assert tokens == 6
    figures = _figures(text)
    for name, count in (
        ("sirllm_request_latency_seconds", 1),
        ("sirllm_time_to_first_token_seconds", 1),
        ("sirllm_inter_token_latency_seconds", tokens),  # counted once per generated token
    ):
        assert f"# TYPE {name} histogram" in text
        buckets = [
            (line.split('le="')[1].split('"')[0], figures[line.split(" ")[0]])
            for line in text.splitlines()
            if line.startswith(f"{name}_bucket")
        ]
        assert buckets[-1] == ("+Inf", count) and figures[f"{name}_count"] == count
        counts = [value for _, value in buckets]
        assert counts == sorted(counts), name  # cumulative
        assert figures[f"{name}_sum"] > 0
    # The first token comes before the whole reply, and one token's time is a fraction of the reply's.
    assert figures["sirllm_time_to_first_token_seconds_sum"] <= figures["sirllm_request_latency_seconds_sum"]
    assert figures["sirllm_inter_token_latency_seconds_sum"] < figures["sirllm_request_latency_seconds_sum"]


@contextlib.contextmanager
def _counted_forwards(engine, monkeypatch, gate: threading.Event | None = None):
    """Counts the forwards of the sessions made from now on; with ``gate``, the first one waits for it (and
    ``entered`` is set once it waits)."""
    scheduler = engine.model.scheduler
    ingest = scheduler.ingest
    counts = {"forwards": 0, "entered": threading.Event()}

    def counted(runner, ids):
        counts["forwards"] += 1
        if gate is not None and counts["forwards"] == 1:
            counts["entered"].set()
            assert gate.wait(30)
        return ingest(runner, ids)

    monkeypatch.setattr(scheduler, "ingest", counted)  # a session takes its scheduler's ingest when it is made
    yield counts


def _send_and_leave(url: str, body: dict, session_id: str, leave_when: Callable[[], bool]) -> None:
    """Post ``body`` over a socket of its own, then close it once ``leave_when()`` holds."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-Session-Id: {session_id}\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + payload)
        deadline = time.monotonic() + 30
        while not leave_when():
            assert time.monotonic() < deadline, "the request never got that far"
            time.sleep(0.005)


def _client_gone_count(url: str) -> float:
    figures = _figures(httpx.get(f"{url}/metrics").text)
    return figures.get('sirllm_requests_total{endpoint="/v1/chat/completions",code="499"}', 0.0)


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_client_leaving_a_plain_request_stops_its_decoding(engine, model, monkeypatch):
    messages = [_user(_unique("A very long essay, please."))]
    session_id = uuid.uuid4().hex
    body = {"model": model, "messages": messages, "max_tokens": 4000}
    with _serving(create_app(engine)) as url, _counted_forwards(engine, monkeypatch) as counts:
        _send_and_leave(url, body, session_id, leave_when=lambda: counts["forwards"] >= 5)  # decoding has begun
        _wait_for(lambda: _client_gone_count(url) == 1, "the server never counted the client gone (499)")
        stopped = counts["forwards"]
        time.sleep(0.3)
        assert counts["forwards"] == stopped < 200  # no forward after the answer; far from 4000 tokens
        session = engine.route([], session_id)
        assert session.transcript.messages == messages  # the conversation, without a reply
        assert session.stats.turns == 0
        # The same request again reuses the prompt the session rolled back to.
        retry = _post(url, {**body, "max_tokens": 3}, **{"X-Session-Id": session_id}).json()
        assert retry["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_leaving_during_prefill_stops_the_request_before_it_decodes(engine, model, monkeypatch, stream):
    messages = [_user(_unique("Read this long prompt. " * 40))]
    session_id = uuid.uuid4().hex
    body = {"model": model, "messages": messages, "max_tokens": 4000, "stream": stream}
    gate = threading.Event()
    streams = []
    astream = engine.astream
    monkeypatch.setattr(engine, "astream", lambda *a, **k: streams.append(astream(*a, **k)) or streams[-1])
    with _serving(create_app(engine)) as url, _counted_forwards(engine, monkeypatch, gate) as counts:
        try:
            _send_and_leave(url, body, session_id, leave_when=counts["entered"].is_set)  # the prompt's first chunk
            # The server sees the client go while the prompt is still being prefilled, and closes the stream.
            _wait_for(lambda: streams and streams[0]._cancelled.is_set(), "the server did not close the stream")
        finally:
            gate.set()
        _wait_for(lambda: _client_gone_count(url) == 1, "the server never counted the client gone (499)")
        session = engine.route([], session_id)
        forwards = counts["forwards"]
        time.sleep(0.3)
        assert counts["forwards"] == forwards
        # The prefill that had begun runs to its end (the core stops a stream between its events), then one token
        # at most is decoded, of the 4000 asked: a few forwards in all, and no reply.
        assert forwards <= 8, forwards
        assert session.transcript.messages == messages and session.stats.turns == 0
