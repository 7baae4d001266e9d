"""The server's figures in the Prometheus text format (written here; no client library needed)."""

from __future__ import annotations

import threading
from collections import Counter

from sirllm_agents import Engine, TurnStats
from sirllm_agents.scheduler import Scheduler

# Upper bounds, in seconds, of the histograms' buckets: a whole request, the first token, one decoded token.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

CHAT_PATH = "/v1/chat/completions"

TOKEN_COUNTERS = {
    "prefilled": ("prefilled_tokens", "Prompt tokens run through the model."),
    "reused": ("reused_tokens", "Prompt tokens already in a session's cache, not prefilled again."),
    "evicted": ("evicted_tokens", "Tokens evicted from session caches."),
    "generated": ("generated_tokens", "Tokens generated."),
}


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, their sum and count. Not locked: :class:`Metrics` is."""

    def __init__(self, name: str, help_text: str, bounds: tuple[float, ...]):
        self.name, self.help_text, self.bounds = name, help_text, bounds
        self.buckets = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float, times: int = 1) -> None:
        """Count ``seconds`` ``times`` times."""
        self.sum += seconds * times
        self.count += times
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:  # cumulative: counted in every bucket whose bound it is within
                self.buckets[i] += times

    def lines(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        for bound, count in zip(self.bounds, self.buckets, strict=True):
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {count}')
        return lines + [
            f'{self.name}_bucket{{le="+Inf"}} {self.count}',
            f"{self.name}_sum {self.sum:.6f}",
            f"{self.name}_count {self.count}",
        ]


class Metrics:
    """Counters of the requests served and the tokens they moved, and the latency histograms; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.tokens: Counter[str] = Counter()
        self.latency = Histogram(
            "sirllm_request_latency_seconds",
            "Time to answer a chat completion request, to its last byte.",
            LATENCY_BUCKETS,
        )
        self.first_token = Histogram(
            "sirllm_time_to_first_token_seconds",
            "Time from a chat completion request's arrival to its reply's first piece (text or tool call).",
            FIRST_TOKEN_BUCKETS,
        )
        self.per_token = Histogram(
            "sirllm_inter_token_latency_seconds",
            "Decoding time per generated token: each reply's decode seconds over its tokens, counted once a token.",
            TOKEN_BUCKETS,
        )
        self.in_flight = 0

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if endpoint == CHAT_PATH:
                self.latency.observe(seconds)

    def first_token_after(self, seconds: float) -> None:
        with self._lock:
            self.first_token.observe(seconds)

    def turn(self, stats: TurnStats) -> None:
        with self._lock:
            for name, (field, _) in TOKEN_COUNTERS.items():
                self.tokens[name] += getattr(stats, field)
            if stats.generated_tokens:
                self.per_token.observe(stats.decode_seconds / stats.generated_tokens, stats.generated_tokens)

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
                "# HELP sirllm_requests_total Requests answered, by endpoint and status code (499: the client "
                "closed the connection first).",
                "# TYPE sirllm_requests_total counter",
            ]
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f'sirllm_requests_total{{endpoint="{endpoint}",code="{status}"}} {count}')
            for histogram in (self.latency, self.first_token, self.per_token):
                lines += histogram.lines()
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
