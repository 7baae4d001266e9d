"""An agent that runs for thousands of steps: is each step's cost, and the process's memory, flat in the history?

One session on the embedded model, cache 512, through the core API as an agent framework would use it: every step
sends the whole conversation with one new short observation; nine steps in ten the agent's reply is scripted and the
step is ingested (``Session.ingest``), every tenth it is generated (``Session.chat``). Per step it records the wall
time, the process's CPU time (all its threads: on a shared machine this moves far less with other processes' load
than the wall time does), the time inside the model (prefill and decode, from the turn's stats), the process's
resident memory and the history length. The summary compares the median step of the last tenth of the run against
the second tenth (the first holds the warm-up), in wall and CPU time, and the memory after step 500 against the end.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import psutil

from sirllm_agents import Engine

SYSTEM = "You are a monitoring agent. After each observation, say in one short sentence what you will check next."
REPLIES = ("Checking the next sensor.", "Noted; moving on.", "Logging that and waiting.", "All clear, continuing.")
RSS_FROM_STEP = 500


def observation(step: int) -> str:
    """A short deterministic tool output, different at every step (about 20 tokens)."""
    return f"Sensor {step % 37} at step {step}: {20 + step % 9}.{step % 10} C, fan {900 + (step * 13) % 300} rpm."


def run(
    engine: Engine,
    steps: int,
    cache_size: int,
    reply_every: int,
    reply_tokens: int,
    threads: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    session = engine.session(cache_size=cache_size)
    process = psutil.Process()
    messages: list[dict] = [{"role": "system", "content": SYSTEM}]
    records = []
    for step in range(steps):
        messages.append({"role": "user", "content": observation(step)})
        start, cpu_start = time.perf_counter(), time.process_time()
        if step % reply_every == 0:
            reply = session.chat(messages, max_new_tokens=reply_tokens)
            messages.append(reply.as_message())
            stats = reply.stats
        else:
            messages.append({"role": "assistant", "content": REPLIES[step % len(REPLIES)]})
            stats = session.ingest(messages)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        records.append(
            {
                "step": step,
                "generated": step % reply_every == 0,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "model_seconds": stats.prefill_seconds + stats.decode_seconds,
                "rss_mib": process.memory_info().rss / 2**20,
                "messages": len(messages),
                "prefilled": stats.prefilled_tokens,
                "restarts": stats.restarts,
                "cache_len": len(session),
            }
        )
        if progress is not None:
            progress(step + 1, steps)
    return {
        "task": "long-run",
        "backend": engine.model.backend.name,
        "model": engine.model.name,
        "threads": threads,
        "steps": steps,
        "cache_size": cache_size,
        "reply_every": reply_every,
        "reply_tokens": reply_tokens,
        "history_tokens": session.transcript.length,
        "summary": summarize(records),
        "records": records,
    }


def summarize(records: list[dict]) -> dict:
    """Per tenth of the run: the median step (all steps, and the ingested ones alone) in wall and CPU time, the median
    time outside the model, and the memory at its end; then the targets' ratios."""
    tenth = max(1, len(records) // 10)
    deciles = []
    for begin in range(0, tenth * 10, tenth):
        part = records[begin : begin + tenth]
        ingested = [r for r in part if not r["generated"]] or part
        deciles.append(
            {
                "steps": [part[0]["step"], part[-1]["step"]],
                "median_ms": 1000 * statistics.median(r["seconds"] for r in part),
                "median_ingest_ms": 1000 * statistics.median(r["seconds"] for r in ingested),
                "median_cpu_ms": 1000 * statistics.median(r["cpu_seconds"] for r in part),
                "median_host_ms": 1000 * statistics.median(r["seconds"] - r["model_seconds"] for r in part),
                "rss_mib": part[-1]["rss_mib"],
                "messages": part[-1]["messages"],
            }
        )
    base = records[min(RSS_FROM_STEP, len(records) - 1)]["rss_mib"]
    return {
        "deciles": deciles,
        "last_over_second": deciles[-1]["median_ms"] / deciles[1]["median_ms"],
        "last_over_second_ingest": deciles[-1]["median_ingest_ms"] / deciles[1]["median_ingest_ms"],
        "last_over_second_cpu": deciles[-1]["median_cpu_ms"] / deciles[1]["median_cpu_ms"],
        "rss_after_step_500_mib": base,
        "rss_end_mib": records[-1]["rss_mib"],
        "rss_growth": records[-1]["rss_mib"] / base - 1,
        "restarts": sum(r["restarts"] for r in records),
        "max_cache_len": max(r["cache_len"] for r in records),
    }


def _figure(cell: dict, key: str, digits: int) -> str:
    """A figure of the table, ``-`` where the result predates it (the CPU and ingest columns came later)."""
    return "-" if cell.get(key) is None else f"{cell[key]:.{digits}f}"


def table(results: dict) -> str:
    """The summary as a markdown table, one row per tenth of the run."""
    s = results["summary"]
    lines = [
        f"{results['backend']}, {results['steps']} steps, cache {results['cache_size']}, {results['threads']} threads:",
        "| steps | messages | median step (ms) | ingested steps (ms) | CPU per step (ms) | outside the model (ms) | "
        "RSS (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d in s["deciles"]:
        lines.append(
            f"| {d['steps'][0]}-{d['steps'][1]} | {d['messages']} | {d['median_ms']:.1f} | "
            f"{_figure(d, 'median_ingest_ms', 1)} | {_figure(d, 'median_cpu_ms', 1)} | "
            f"{_figure(d, 'median_host_ms', 2)} | {d['rss_mib']:.0f} |"
        )
    lines.append(
        f"last tenth / second tenth: {s['last_over_second']:.3f} (ingested steps "
        f"{_figure(s, 'last_over_second_ingest', 3)}, CPU time {_figure(s, 'last_over_second_cpu', 3)});"
        f" RSS growth after step {RSS_FROM_STEP}: {100 * s['rss_growth']:.2f}%; restarts {s['restarts']}; "
        f"largest cache {s['max_cache_len']}"
    )
    return "\n".join(lines) + "\n"
