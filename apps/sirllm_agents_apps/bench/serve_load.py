"""Load on the OpenAI-compatible server, two workloads.

**chat**: N concurrent conversations of M turns, each turn a chat completion with the whole conversation so far, sent
twice: **stateful** (one ``X-Session-Id`` per conversation, so each turn prefills only its new messages) and
**stateless** (a fresh ``X-Session-Id`` per request, so every turn prefills its whole prompt, as a server without
session reuse would). Reports requests per second, generated tokens per second and per-request latency (p50, p95)
for each, from a server started here on 127.0.0.1 (or one given by ``url``).

**agent**: N concurrent conversations shaped like an agent's loop (:func:`agent_turns`): a system prompt and a task,
then at every turn the output of a tool (about 100 tokens of generated JSON or log lines) and a greedy reply of up to
32 tokens, 10 turns; run for each N of 1, 4 and 8 against each target: a sirllm-agents server started here, one
already running at a URL (the same workload against another checkout's server), and llama.cpp's C++ ``llama-server
--parallel N --cont-batching`` on the same GGUF with prompt caching on (built by ``benchmarks/build_llama_server.sh``).
Reports aggregate generated tokens per second, p50 and p95 per-turn latency, prompt tokens reused per turn and, for the
server started here, the largest cache length any conversation reached against its bound."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
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
    wall = _together(_conversation, [(url, i, turns, max_tokens, stateless, requests) for i in range(conversations)])
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


def _together(conversation: Callable[..., None], arguments: list[tuple]) -> float:
    """Runs ``conversation`` once per tuple of ``arguments``, each in a thread of its own, all at once; the wall
    seconds until the last one ends."""
    threads = [threading.Thread(target=conversation, args=args) for args in arguments]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


@contextlib.contextmanager
def local_server(
    model: str | None, cache_size: int | None, max_live_sessions: int, threads: int | None = None
) -> Iterator[str]:
    """A server on the model, in this process on a free port of 127.0.0.1; yields its URL."""
    from sirllm_agents import Engine, SessionConfig

    engine = Engine(
        model, config=SessionConfig(cache_size=cache_size), max_live_sessions=max_live_sessions, threads=threads
    )
    with serving(engine) as url:
        yield url


@contextlib.contextmanager
def serving(engine) -> Iterator[str]:
    """The server over ``engine``, in this process on a free port of 127.0.0.1; yields its URL."""
    import uvicorn

    from ..server import ServerSettings, create_app

    port = _free_port()
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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llamacpp_server(threads: int) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server on the embedded GGUF, in a child process on a free port of
    127.0.0.1 (its context: the model's 8192 tokens); yields its URL."""
    import subprocess
    import sys

    import httpx

    from sirllm_agents.loading import embedded_model_path

    port = _free_port()
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


# -- the agent workload -----------------------------------------------------------------------------------------------

AGENT_SYSTEM = (
    "You are an on-call operations agent. Each user message brings the output of a tool you ran. Reply in one or "
    "two sentences: what the output shows, and which tool you run next."
)
AGENT_TASKS = [
    "Checkout requests are slow since the last deploy. Find out why.",
    "Users report failed logins this morning. Investigate.",
    "The search index is stale by several hours. Find the cause.",
    "Invoices were sent twice to some customers. Trace what happened.",
    "Image uploads time out for large files. Diagnose it.",
    "The ledger totals disagree with the bank export. Look into it.",
    "Push notifications arrive late. Find where they wait.",
    "Address lookups return errors for one region. Investigate.",
]
SERVICES = ["checkout", "auth-gateway", "search-indexer", "billing-api", "media-resizer", "ledger", "notifier", "geo"]
LOG_EVENTS = [
    "upstream timeout after {ms} ms",
    "retrying request {hex} (attempt {n})",
    "pool exhausted: {n} of {n} connections busy",
    "slow query on table orders took {ms} ms",
    "cache miss ratio {ratio} over the last minute",
    "health check passed in {ms} ms",
]
TICKET_TITLES = ["latency spike", "failed deploy", "disk almost full", "certificate expiry", "memory leak"]


def _metrics_output(rng, service: str) -> str:
    hosts = [{"host": f"node-{rng.randint(1, 40):02d}", "cpu": round(rng.uniform(0.1, 0.99), 2)} for _ in range(3)]
    return json.dumps(
        {
            "service": service,
            "p50_ms": rng.randint(20, 200),
            "p95_ms": rng.randint(200, 3000),
            "error_rate": round(rng.uniform(0, 0.2), 3),
            "hosts": hosts,
        }
    )


def _logs_output(rng, service: str) -> str:
    lines = []
    for _ in range(4):
        event = rng.choice(LOG_EVENTS).format(
            ms=rng.randint(100, 5000),
            hex=f"{rng.getrandbits(24):06x}",
            n=rng.randint(2, 9),
            ratio=round(rng.random(), 2),
        )
        level = rng.choice(("INFO", "WARN", "ERROR"))
        lines.append(f"12:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} {level} {service} {event}")
    return "\n".join(lines)


def _tickets_output(rng, service: str) -> str:
    results = [
        {
            "id": f"OPS-{rng.randint(1000, 9999)}",
            "title": f"{service} {rng.choice(TICKET_TITLES)}",
            "status": rng.choice(("open", "closed")),
        }
        for _ in range(3)
    ]
    return json.dumps({"query": service, "results": results})


TOOLS = {"get_metrics": _metrics_output, "read_logs": _logs_output, "search_tickets": _tickets_output}


def tool_output(conversation: int, turn: int) -> tuple[str, str]:
    """The tool the agent of ``conversation`` ran before ``turn``, and its output: about 100 tokens of JSON or log
    lines, the same on every call (drawn from a generator seeded by the pair)."""
    import random

    rng = random.Random(conversation * 1009 + turn)
    name = list(TOOLS)[(conversation + turn) % len(TOOLS)]
    return name, TOOLS[name](rng, SERVICES[conversation % len(SERVICES)])


def agent_turns(conversation: int, turns: int) -> list[list[dict[str, str]]]:
    """The messages each turn of agent conversation ``conversation`` adds before asking for a reply: the system
    prompt, the task and the first tool output at turn 0, then one tool output a turn. Tool outputs come as user
    messages (not ``tool`` messages after a call), so that every server renders them with the plain chat template."""
    added = []
    for turn in range(turns):
        name, output = tool_output(conversation, turn)
        text = f"Tool `{name}` returned:\n{output}"
        if turn == 0:
            task = AGENT_TASKS[conversation % len(AGENT_TASKS)]
            added.append(
                [{"role": "system", "content": AGENT_SYSTEM}, {"role": "user", "content": f"{task}\n\n{text}"}]
            )
        else:
            added.append([{"role": "user", "content": text}])
    return added


def _agent_conversation(
    url: str, kind: str, index: int, turns: int, max_tokens: int, run_id: str, out: list[dict], errors: list
) -> None:
    """One agent conversation's turns, each turn's figures appended to ``out``; an error ends it and goes to
    ``errors``. Prompt tokens reused: ``usage.prompt_tokens_details.cached_tokens`` from sirllm-agents,
    ``timings.cache_n`` from llama-server."""
    import httpx

    session_id = f"agent-{run_id}-{index}"
    messages: list[dict[str, str]] = []
    turn = 0
    try:
        with httpx.Client(timeout=900) as client:
            for turn, added in enumerate(agent_turns(index, turns)):
                messages += added
                body: dict[str, Any] = {"model": "sirllm", "messages": messages, "max_tokens": max_tokens}
                body.update(temperature=0, seed=0)
                if kind == "llama-server":
                    body["cache_prompt"] = True
                started = time.perf_counter()
                response = client.post(f"{url}/v1/chat/completions", json=body, headers={"X-Session-Id": session_id})
                seconds = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
                data = response.json()
                usage = data["usage"]
                timings = data.get("timings") or {}
                reused = timings.get("cache_n", (usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
                reply = data["choices"][0]["message"].get("content") or ""
                out.append(
                    {
                        "conversation": index,
                        "turn": turn,
                        "session_id": session_id,
                        "seconds": seconds,
                        "prompt_tokens": usage["prompt_tokens"],
                        "reused_tokens": reused,
                        "completion_tokens": usage["completion_tokens"],
                        "reply": reply,
                        **({"timings": timings} if timings else {}),  # llama-server's own prompt and decode times
                    }
                )
                messages.append({"role": "assistant", "content": reply})
    except Exception as error:  # reported by the caller, which names the conversation it ended
        errors.append(f"conversation {index}, turn {turn}: {type(error).__name__}: {error}")


def agent_figures(requests: list[dict], wall: float) -> dict[str, Any]:
    """One run's figures from its per-turn records: aggregate generated tokens per second over the run's wall time,
    per-turn latency, and per-turn means of prompt tokens and of those reused (None when the server did not say)."""
    latencies = [r["seconds"] for r in requests]
    reused = [r["reused_tokens"] for r in requests]
    known = None not in reused
    later = [r["reused_tokens"] for r in requests if r["turn"] > 0]
    prompt = sum(r["prompt_tokens"] for r in requests)
    return {
        "requests": len(requests),
        "wall_seconds": wall,
        "generated_tokens": sum(r["completion_tokens"] for r in requests),
        "generated_tokens_per_second": sum(r["completion_tokens"] for r in requests) / wall,
        "turn_latency_p50": percentile(latencies, 0.5),
        "turn_latency_p95": percentile(latencies, 0.95),
        "turn_latency_mean": statistics.fmean(latencies),
        "prompt_tokens_per_turn": prompt / len(requests),
        "reused_tokens_per_turn": statistics.fmean(reused) if known else None,
        "reused_tokens_per_later_turn": statistics.fmean(later) if known and later else None,
        "reused_share": sum(reused) / prompt if known and prompt else None,
    }


def run_agents(url: str, kind: str, conversations: int, turns: int, max_tokens: int) -> dict[str, Any]:
    """``conversations`` agent conversations at once against the server at ``url`` (``kind``: ``sirllm`` or
    ``llama-server``), each of ``turns`` turns; its figures (:func:`agent_figures`) and its per-turn records."""
    requests: list[dict] = []
    errors: list[str] = []
    run_id = uuid.uuid4().hex[:12]
    arguments = [(url, kind, i, turns, max_tokens, run_id, requests, errors) for i in range(conversations)]
    wall = _together(_agent_conversation, arguments)
    if errors:
        raise RuntimeError(f"{len(errors)} of {conversations} conversations failed at {url}: {errors[0]}")
    return {
        "conversations": conversations,
        "turns": turns,
        **agent_figures(requests, wall),
        "per_request": sorted(requests, key=lambda r: (r["conversation"], r["turn"])),
    }


def cache_bound(engine, session_ids: list[str]) -> dict[str, Any]:
    """The largest cache length the sessions ``session_ids`` of ``engine``'s pool reached after any of their calls,
    against their ``cache_size``: SirLLM's bound held when none passed it."""
    largest, bound = 0, None
    for session_id in session_ids:
        session = engine.route([], session_id)
        largest = max([largest, *(turn.cache_len for turn in session.turn_log)])
        size = session.config.cache_size
        bound = size if bound is None else min(bound, size)
    return {"largest_cache_len": largest, "cache_size": bound, "bound_held": bound is not None and largest <= bound}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the agent workload goes: ``here`` (a sirllm-agents server started in this process), ``llama-server``
    (llama.cpp's C++ server, started per N), or a running sirllm-agents server at ``url``."""

    name: str
    kind: str  # "here", "llama-server" or "url"
    url: str | None = None


def parse_targets(text: str) -> list[Target]:
    """``here``, ``llama-server`` and ``NAME=URL`` items, comma-separated, in the order to run them."""
    targets = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, url = item.partition("=")
        if equals:
            if not url.startswith(("http://", "https://")) or not name:
                raise ValueError(f"a running server is NAME=http://HOST:PORT, got {item!r}")
            targets.append(Target(name, "url", url.rstrip("/")))
        elif item in ("here", "llama-server"):
            targets.append(Target(item, item))
        else:
            raise ValueError(f"unknown target {item!r}: expected here, llama-server or NAME=URL")
    if not targets or len({t.name for t in targets}) != len(targets):
        raise ValueError(f"targets must be one or more distinct names, got {text!r}")
    return targets


def default_llama_server() -> Path:
    """Where ``benchmarks/build_llama_server.sh`` puts the binary."""
    from sirllm_agents.loading import cache_home

    return cache_home() / "llama-server" / "llama-server"


def llama_server_files(model: str | None, binary: str | Path | None) -> tuple[Path, Path]:
    """The GGUF file llama-server is to run (``model`` when it is one, else the embedded model's) and its binary
    (``binary``, else where the build script puts it); a ValueError or FileNotFoundError that says what to do when
    either is missing."""
    from sirllm_agents.loading import embedded_model_path

    if model and not str(model).endswith(".gguf"):
        raise ValueError(f"llama-server needs a GGUF file: --model {model!r} is not one")
    binary = Path(binary) if binary else default_llama_server()
    if not binary.is_file():
        raise FileNotFoundError(
            f"no llama-server at {binary}: build it with `bash benchmarks/build_llama_server.sh` "
            "(or give its path with --llama-server-bin)"
        )
    return (Path(model) if model else embedded_model_path()), binary


@contextlib.contextmanager
def llama_server(binary: Path, gguf: Path, parallel: int, threads: int, slot_context: int) -> Iterator[str]:
    """llama.cpp's C++ server on ``gguf`` in a child process on a free port of 127.0.0.1: ``parallel`` slots of
    ``slot_context`` tokens each (a KV buffer per slot), continuous batching, ``threads`` threads; yields its URL
    once ``/health`` answers. Its log goes to a temporary file, whose end is in the error when it fails to start."""
    import subprocess
    import tempfile

    import httpx

    port = _free_port()
    command = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--parallel", str(parallel), "--cont-batching", "--no-kv-unified"]
    command += ["--ctx-size", str(parallel * slot_context), "--threads", str(threads), "--threads-batch", str(threads)]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                if child.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = "".join(log.readlines()[-15:])
                    raise RuntimeError(f"llama-server did not start ({' '.join(command)}):\n{tail}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            yield url
        finally:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def run_agent_bench(
    targets: list[Target],
    counts: list[int],
    turns: int = 10,
    max_tokens: int = 32,
    model: str | None = None,
    cache_size: int | None = None,
    threads: int = 2,
    llama_server_binary: str | Path | None = None,
    slot_context: int = 4096,
    report: Callable[[str], None] | None = None,
    make_engine: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """The agent workload for each target and each N in ``counts``: the sirllm-agents server here (one engine per
    N, so each N starts from an empty pool), running servers by URL, and llama-server (started per N with
    ``--parallel N``) on the GGUF of ``model`` (default: the embedded model's). Each server first answers one short
    request, untimed. ``report`` gets a line after each run; ``make_engine(N)``, when given, makes the engine of the
    server here instead of ``model`` and ``cache_size``. The results as JSON data."""
    gguf = binary = None
    if any(t.kind == "llama-server" for t in targets):
        gguf, binary = llama_server_files(model, llama_server_binary)
    runs = []
    for target in targets:
        for count in counts:
            with contextlib.ExitStack() as stack:
                engine = None
                if target.kind == "here":
                    engine = (make_engine or _engine_maker(model, cache_size, threads))(count)
                    url = stack.enter_context(serving(engine))
                elif target.kind == "llama-server":
                    url = stack.enter_context(llama_server(binary, gguf, count, threads, slot_context))
                else:
                    url = target.url
                kind = "llama-server" if target.kind == "llama-server" else "sirllm"
                _warm_up(url, kind)
                run = {"target": target.name, "kind": target.kind, "url": target.url}
                run.update(run_agents(url, kind, count, turns, max_tokens))
                if engine is not None:
                    sessions = sorted({r["session_id"] for r in run["per_request"]})
                    run.update(cache_bound(engine, sessions), backend=engine.model.backend.name)
                    run["parallel"] = engine.model.scheduler.max_running
            runs.append(run)
            if report:
                report(_run_line(run))
    for run in runs:
        alone = next((r for r in runs if r["target"] == run["target"] and r["conversations"] == 1), None)
        run["conversation_0_as_alone"] = None if alone is None else _replies(run, 0) == _replies(alone, 0)
    return {
        "task": "serve-agent",
        "workload": {
            "turns": turns,
            "max_tokens": max_tokens,
            "greedy": True,
            "tool_output_tokens": "about 100 (generated JSON or log lines, one a turn)",
        },
        "counts": counts,
        "threads": threads,
        "model": model or "embedded",
        "gguf": str(gguf) if gguf else None,
        "llama_server": None
        if binary is None
        else {"binary": str(binary), "version": _built_version(binary), "slot_context": slot_context},
        "runs": runs,
    }


def _engine_maker(model: str | None, cache_size: int | None, threads: int) -> Callable[[int], Any]:
    """Makes the engine of the server here for N conversations: ``parallel=N`` (the scheduler's bound on calls run
    at once), as llama-server gets ``--parallel N``."""

    def make(conversations: int):
        from sirllm_agents import Engine, SessionConfig

        config = SessionConfig(cache_size=cache_size)
        live = max(8, 2 * conversations)
        return Engine(model, config=config, max_live_sessions=live, threads=threads, parallel=conversations)

    return make


def _warm_up(url: str, kind: str) -> None:
    import httpx

    body: dict[str, Any] = {"model": "sirllm", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2}
    if kind == "llama-server":
        body["cache_prompt"] = True
    httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).raise_for_status()


def _replies(run: dict[str, Any], conversation: int) -> list[str]:
    return [r["reply"] for r in run["per_request"] if r["conversation"] == conversation]


def _built_version(binary: Path) -> str | None:
    """The llama-cpp-python release the build script recorded beside the binary."""
    stamp = binary.parent / "VERSION"
    return stamp.read_text().strip() if stamp.is_file() else None


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _run_line(run: dict[str, Any]) -> str:
    return (
        f"{run['target']} N={run['conversations']}: {run['generated_tokens_per_second']:.1f} gen tok/s, "
        f"p50 {run['turn_latency_p50']:.2f} s, p95 {run['turn_latency_p95']:.2f} s"
    )


def agent_table(results: dict[str, Any]) -> str:
    """The agent workload's figures as a markdown table."""
    lines = [
        "| target | N | turns | gen tok/s | p50 s | p95 s | prompt tok/turn | reused tok/turn | largest cache / bound "
        "|",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        cache = "-"
        if run.get("largest_cache_len") is not None:
            cache = f"{run['largest_cache_len']} / {run['cache_size']}" + ("" if run["bound_held"] else " PASSED")
        lines.append(
            f"| {run['target']} | {run['conversations']} | {run['turns']} | "
            f"{run['generated_tokens_per_second']:.1f} | {run['turn_latency_p50']:.2f} | "
            f"{run['turn_latency_p95']:.2f} | {run['prompt_tokens_per_turn']:.0f} | "
            f"{_cell(run['reused_tokens_per_turn'], '.0f')} | {cache} |"
        )
    return "\n".join(lines) + "\n"
