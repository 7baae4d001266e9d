"""Load on the OpenAI-compatible server: N concurrent conversations of M turns, each turn a chat completion with the
whole conversation so far, sent twice: **stateful** (one ``X-Session-Id`` per conversation, so each turn prefills only
its new messages) and **stateless** (a fresh ``X-Session-Id`` per request, so every turn prefills its whole prompt, as
a server without session reuse would). Reports requests per second, generated tokens per second and per-request
latency (p50, p95) for each, from a server started here on 127.0.0.1 (or one given by ``url``)."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

OPENINGS = [
    "You are planning a trip to Lisbon. Suggest what to see on the first day.",
    "Help me write a short story about a lighthouse keeper.",
    "Explain how a hash map works to a new programmer.",
    "I want to start running. Give me a plan for the first week.",
    "Summarise the causes of the French Revolution.",
    "Describe how to bake sourdough bread at home.",
    "What should I consider when adopting a dog?",
    "Teach me the basics of chess openings.",
]
FOLLOW_UPS = ["Go on.", "Give more detail.", "What else?", "Why?", "Give an example.", "Summarise so far."]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, interpolated linearly between ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _conversation(url: str, index: int, turns: int, max_tokens: int, stateless: bool, out: list[dict]) -> None:
    """One conversation's turns; llama.cpp's server reports no reused tokens, recorded as None."""
    import httpx

    session_id = f"bench-{uuid.uuid4().hex}"
    messages = [{"role": "user", "content": OPENINGS[index % len(OPENINGS)]}]
    with httpx.Client(timeout=600) as client:
        for turn in range(turns):
            if turn:
                messages.append({"role": "user", "content": FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]})
            sid = f"bench-{uuid.uuid4().hex}" if stateless else session_id
            body = {"model": "sirllm", "messages": messages, "max_tokens": max_tokens}
            started = time.perf_counter()
            response = client.post(f"{url}/v1/chat/completions", json=body, headers={"X-Session-Id": sid})
            seconds = time.perf_counter() - started
            response.raise_for_status()
            data = response.json()
            usage = data["usage"]
            out.append(
                {
                    "conversation": index,
                    "turn": turn,
                    "seconds": seconds,
                    "prompt_tokens": usage["prompt_tokens"],
                    "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                    "completion_tokens": usage["completion_tokens"],
                }
            )
            messages.append({"role": "assistant", "content": data["choices"][0]["message"]["content"]})


def run_mode(
    url: str, conversations: int, turns: int, max_tokens: int, stateless: bool, mode: str | None = None
) -> dict[str, Any]:
    """One mode's figures over ``conversations`` concurrent conversations of ``turns`` turns."""
    requests: list[dict] = []
    threads = [
        threading.Thread(target=_conversation, args=(url, i, turns, max_tokens, stateless, requests))
        for i in range(conversations)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if len(requests) != conversations * turns:
        raise RuntimeError(f"only {len(requests)} of {conversations * turns} requests succeeded")
    latencies = [r["seconds"] for r in requests]
    return {
        "mode": mode or ("stateless" if stateless else "stateful"),
        "requests": len(requests),
        "wall_seconds": wall,
        "requests_per_second": len(requests) / wall,
        "generated_tokens_per_second": sum(r["completion_tokens"] for r in requests) / wall,
        "latency_p50": percentile(latencies, 0.5),
        "latency_p95": percentile(latencies, 0.95),
        "latency_mean": statistics.fmean(latencies),
        "prompt_tokens": sum(r["prompt_tokens"] for r in requests),
        "cached_tokens": None
        if any(r["cached_tokens"] is None for r in requests)
        else sum(r["cached_tokens"] for r in requests),
        "last_turn_latency_p50": percentile([r["seconds"] for r in requests if r["turn"] == turns - 1], 0.5),
        "per_request": sorted(requests, key=lambda r: (r["conversation"], r["turn"])),
    }


@contextlib.contextmanager
def local_server(model: str | None, cache_size: int | None, max_live_sessions: int) -> Iterator[str]:
    """A server on the model, in this process on a free port of 127.0.0.1; yields its URL."""
    import socket

    import uvicorn

    from sirllm_agents import Engine, SessionConfig

    from ..server import ServerSettings, create_app

    engine = Engine(model, config=SessionConfig(cache_size=cache_size), max_live_sessions=max_live_sessions)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(engine, ServerSettings(max_queue=256))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


@contextlib.contextmanager
def llamacpp_server(threads: int) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server on the embedded GGUF, in a child process on a free port of
    127.0.0.1 (its context: the model's 8192 tokens); yields its URL."""
    import socket
    import subprocess
    import sys

    import httpx

    from sirllm_agents.loading import embedded_model_path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path())]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "8192", "--n_threads", str(threads)]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if child.poll() is not None:
                raise RuntimeError("llama.cpp's server exited at start: pip install 'llama-cpp-python[server]'")
            try:
                httpx.get(f"{url}/v1/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        child.terminate()
        child.wait(30)


def run(
    conversations: int,
    turns: int,
    max_tokens: int,
    url: str | None = None,
    model: str | None = None,
    cache_size: int | None = None,
    llamacpp_threads: int | None = None,
) -> dict[str, Any]:
    """Both modes, stateful first, against ``url`` or a server started here; with ``llamacpp_threads``, then the same
    conversations against llama.cpp's own server on the embedded model. The results as JSON data."""
    with contextlib.ExitStack() as stack:
        if url is None:
            url = stack.enter_context(local_server(model, cache_size, max_live_sessions=4 * conversations))
        # One short request first so that neither mode pays the first call's warm-up.
        run_mode(url, 1, 1, 2, stateless=True)
        modes = [run_mode(url, conversations, turns, max_tokens, stateless) for stateless in (False, True)]
    if llamacpp_threads:
        with llamacpp_server(llamacpp_threads) as cpp:
            run_mode(cpp, 1, 1, 2, stateless=True)
            modes.append(run_mode(cpp, conversations, turns, max_tokens, False, mode="llama.cpp server"))
    return {
        "task": "serve",
        "conversations": conversations,
        "turns": turns,
        "max_tokens": max_tokens,
        "model": model or "embedded",
        "modes": modes,
    }


def table(results: dict[str, Any]) -> str:
    """The figures as a markdown table."""
    lines = [
        "| mode | requests | wall s | req/s | gen tok/s | p50 s | p95 s | last turn p50 s | prompt tok | cached tok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results["modes"]:
        lines.append(
            f"| {m['mode']} | {m['requests']} | {m['wall_seconds']:.1f} | {m['requests_per_second']:.2f} | "
            f"{m['generated_tokens_per_second']:.1f} | {m['latency_p50']:.2f} | {m['latency_p95']:.2f} | "
            f"{m['last_turn_latency_p50']:.2f} | {m['prompt_tokens']} | "
            f"{'-' if m['cached_tokens'] is None else m['cached_tokens']} |"
        )
    return "\n".join(lines) + "\n"
