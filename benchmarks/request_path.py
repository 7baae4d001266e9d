"""What one call costs outside the model, against the messages a session already holds: the core API and the
OpenAI-compatible server.

A tiny random-weight Llama over the embedded tokenizer keeps the forward passes short; each call adds one user
message to a conversation of N messages the session holds, and asks for a 2-token reply (the server's requests carry
the whole conversation as JSON, with ``X-Session-Id``). Per N it prints the median over the calls of: the wall time,
the time inside the model (prefill and decode, from the turn's stats), what is left (the request path: matching
the held messages, rendering the new ones, routing, building the response; for the server, its own time from the
ASGI call to its return, so reading the body counts and the test client's work does not), the time pydantic
takes to read the request's JSON alone, what is left beside it, and the cyclic GC's full collections during the
run, with the heap as loaded and frozen (``gc.freeze``, as ``sirllm-agents serve`` does). Target: the time outside
the model does not grow with N beyond reading JSON.

    python benchmarks/request_path.py [--messages 1000,4000,10000] [--calls 15]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from fastapi.testclient import TestClient
from sirllm_agents_apps.server.app import create_app
from sirllm_agents_apps.server.schemas import ChatCompletionRequest
from transformers import LlamaConfig, LlamaForCausalLM

from sirllm_agents import Engine
from sirllm_agents.loading import embedded_tokenizer


def tiny_engine() -> Engine:
    tokenizer = embedded_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Engine(LlamaForCausalLM(config).eval(), tokenizer=tokenizer)


def conversation(n: int) -> list[dict]:
    messages = []
    for i in range(n // 2):
        messages.append({"role": "user", "content": f"Observation {i}: the sensor reads {i * 7 % 1000} units."})
        messages.append({"role": "assistant", "content": f"Noted reading {i}."})
    return messages


def core_call(engine: Engine, messages: list[dict], calls: int) -> list[tuple[float, float]]:
    session = engine.session(cache_size=512)
    session.ingest(messages)
    timings = []
    for i in range(calls):
        messages = messages + [{"role": "user", "content": f"Observation x{i}: fine."}]
        start = time.perf_counter()
        reply = session.chat(messages, max_new_tokens=2)
        wall = time.perf_counter() - start
        assert reply.stats.restarts == 0
        timings.append((wall, reply.stats.prefill_seconds + reply.stats.decode_seconds))
        messages = messages + [reply.as_message()]
    return timings


class ServerClock:
    """An ASGI app's own time per request, from its call to its return (reading the body included): the server's
    work without the test client's."""

    def __init__(self, app) -> None:
        self.app, self.seconds = app, []

    async def __call__(self, scope, receive, send) -> None:
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                self.seconds.append(time.perf_counter() - start)


def server_call(
    engine: Engine, messages: list[dict], calls: int, name: str
) -> tuple[list[tuple[float, float]], list[float]]:
    clock = ServerClock(create_app(engine))
    client = TestClient(clock)
    headers = {"X-Session-Id": f"bench-{name}-{len(messages)}"}
    body = {"model": "sirllm", "max_tokens": 2, "messages": messages}
    first = client.post("/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == 200, first.text
    messages = messages + [first.json()["choices"][0]["message"]]
    timings, parsing = [], []
    for i in range(calls):
        messages = messages + [{"role": "user", "content": f"Observation x{i}: fine."}]
        payload = {"model": "sirllm", "max_tokens": 2, "messages": messages}
        encoded = json.dumps(payload)  # the client's work, not the server's
        response = client.post("/v1/chat/completions", content=encoded, headers=headers)
        wall = clock.seconds[-1]
        assert response.status_code == 200, response.text
        session = engine.route([], headers["X-Session-Id"])
        turn = session.turn_log[-1]
        assert turn.restarts == 0
        timings.append((wall, turn.prefill_seconds + turn.decode_seconds))
        start = time.perf_counter()
        ChatCompletionRequest.model_validate_json(encoded)
        parsing.append(time.perf_counter() - start)
        messages = messages + [response.json()["choices"][0]["message"]]
    return timings, parsing


class FullCollections:
    """Counts the cyclic GC's full (generation 2) collections while it is on, and the time they took."""

    def __init__(self) -> None:
        self.count, self.seconds, self._started = 0, 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._started

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", default="1000,4000,10000", help="held messages (comma list)")
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    print(
        "| held messages | path | heap | wall (ms) | in the model (ms) | outside the model (ms) | its mean (ms) "
        "| reading the JSON (ms) | outside the model and the JSON (ms) | full GCs (ms in all) |"
    )
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in (int(x) for x in args.messages.split(",")):
        held = conversation(n)
        # As it is, then frozen as `sirllm-agents serve` freezes it once the model is loaded: the ~460k objects the
        # libraries leave make each full collection of the cyclic GC cost ~0.3 s, a pause in whichever call
        # allocates enough to set one off.
        for heap in ("as loaded", "frozen"):
            # A fresh engine per run: what an earlier run's sessions hold would slow the later one.
            engine = tiny_engine()
            gc.collect()
            if heap == "frozen":
                gc.freeze()
            with FullCollections() as core_gc:
                core = core_call(engine, held, args.calls)
            with FullCollections() as server_gc:
                served, parsing = server_call(engine, held, args.calls, heap.replace(" ", "-"))
            gc.unfreeze()
            rows = (("core", core, None, core_gc), ("server", served, parsing, server_gc))
            for path, timings, read, collections in rows:
                wall = 1000 * statistics.median(w for w, _ in timings)
                model = 1000 * statistics.median(m for _, m in timings)
                outside = 1000 * statistics.median(w - m for w, m in timings)
                mean = 1000 * statistics.mean(w - m for w, m in timings)
                reading = 1000 * statistics.median(read) if read else 0.0
                shown = f"{reading:.1f}" if read else ""
                print(
                    f"| {n} | {path} | {heap} | {wall:.1f} | {model:.1f} | {outside:.1f} | {mean:.1f} | {shown} "
                    f"| {outside - reading:.1f} | {collections.count} ({1000 * collections.seconds:.0f}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
