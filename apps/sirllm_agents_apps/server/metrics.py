"""The server's figures in the Prometheus text format (written here; no client library needed)."""

from __future__ import annotations

import threading
from collections import Counter

from sirllm_agents import Engine, TurnStats
from sirllm_agents.scheduler import Scheduler

# Upper bounds, in seconds, of the request-latency histogram's buckets.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

TOKEN_COUNTERS = {
    "prefilled": ("prefilled_tokens", "Prompt tokens run through the model."),
    "reused": ("reused_tokens", "Prompt tokens already in a session's cache, not prefilled again."),
    "evicted": ("evicted_tokens", "Tokens evicted from session caches."),
    "generated": ("generated_tokens", "Tokens generated."),
}


class Metrics:
    """Counters of the requests served and the tokens they moved; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.tokens: Counter[str] = Counter()
        self.latency_buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.in_flight = 0

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if endpoint == "/v1/chat/completions":
                self.latency_sum += seconds
                self.latency_count += 1
                for i, bound in enumerate(LATENCY_BUCKETS):
                    if seconds <= bound:
                        self.latency_buckets[i] += 1

    def turn(self, stats: TurnStats) -> None:
        with self._lock:
            for name, (field, _) in TOKEN_COUNTERS.items():
                self.tokens[name] += getattr(stats, field)

    def render(self, engine: Engine) -> str:
        live, spilled = len(engine.pool.live_ids()), len(engine.pool.spilled_ids())
        with self._lock:
            lines = [
                "# HELP sirllm_sessions_live Sessions held in memory.",
                "# TYPE sirllm_sessions_live gauge",
                f"sirllm_sessions_live {live}",
                "# HELP sirllm_sessions_spilled Sessions written to disk.",
                "# TYPE sirllm_sessions_spilled gauge",
                f"sirllm_sessions_spilled {spilled}",
                "# HELP sirllm_requests_in_flight Chat completion requests being served or waiting.",
                "# TYPE sirllm_requests_in_flight gauge",
                f"sirllm_requests_in_flight {self.in_flight}",
            ]
            lines += _scheduler_lines(engine.model.scheduler)
            for name, (_, help_text) in TOKEN_COUNTERS.items():
                metric = f"sirllm_tokens_{name}_total"
                lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter", f"{metric} {self.tokens[name]}"]
            lines += [
                "# HELP sirllm_requests_total Requests answered, by endpoint and status code.",
                "# TYPE sirllm_requests_total counter",
            ]
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f'sirllm_requests_total{{endpoint="{endpoint}",code="{status}"}} {count}')
            metric = "sirllm_request_latency_seconds"
            lines += [
                f"# HELP {metric} Time to answer a chat completion request, to its last byte.",
                f"# TYPE {metric} histogram",
            ]
            # Already cumulative: a request is counted in every bucket whose bound it is within.
            for bound, count in zip(LATENCY_BUCKETS, self.latency_buckets, strict=True):
                lines.append(f'{metric}_bucket{{le="{bound}"}} {count}')
            lines += [
                f'{metric}_bucket{{le="+Inf"}} {self.latency_count}',
                f"{metric}_sum {self.latency_sum:.6f}",
                f"{metric}_count {self.latency_count}",
            ]
        return "\n".join(lines) + "\n"


def _scheduler_lines(scheduler: Scheduler) -> list[str]:
    """The scheduler's figures: requests decoding and waiting, and how many conversations its calls carried."""
    figures = [
        ("running", "gauge", "Requests being decoded (their forwards batched together).", scheduler.running),
        ("waiting", "gauge", "Requests waiting for the model.", scheduler.waiting),
        ("calls_total", "counter", "Calls into the model's backend (each a batched forward).", scheduler.calls),
        ("forwards_total", "counter", "Conversations' forwards those calls ran.", scheduler.forwards),
    ]
    lines = []
    for name, kind, help_text, value in figures:
        metric = f"sirllm_scheduler_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}", f"{metric} {value}"]
    return lines
