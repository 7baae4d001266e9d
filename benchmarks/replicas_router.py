"""Replicas behind a router against one replica: the agent workload of ``sirllm-agents bench serve --workload agent``
(a tool output of about 100 tokens and a greedy reply a turn) for ``--conversations`` conversations at once, sent to
vllm-router (``--policy consistent_hash`` on ``X-Session-Id``) in front of ``--replicas`` ``sirllm-agents serve``
processes sharing a ``redis-server``, then to one such replica alone. Every turn is committed to Redis before it is
answered in both. Prints, for each, generated tokens per second, turn latency p50 and p95, and the share of prompt
tokens reused, and checks that both gave every conversation the same replies.

Each replica loads its own copy of the embedded model; on a machine with fewer cores than replicas they compete for
the same cores, so the figures show the cost of the router and the store more than any gain from scale.

    python benchmarks/replicas_router.py [--replicas 3] [--conversations 8] [--turns 6] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the tests' redis-server, replica and router starters

from redis_fixtures import RedisServer
from serve_processes import replica, vllm_router
from sirllm_agents_apps.bench.serve_load import run_agents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the figures here")
    parser.add_argument("--router-log", default=None, metavar="FILE", help="vllm-router's log, at info level")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder), appendfsync="everysec")
        server.start()
        try:  # one Redis for both runs: their conversations have ids of their own
            for name, count in ((f"{args.replicas} replicas + router", args.replicas), ("1 replica", 1)):
                with contextlib.ExitStack() as running:
                    workers = [running.enter_context(replica(None, server.url, f"r{i}"))[0] for i in range(count)]
                    url = workers[0]
                    if count > 1:
                        log = running.enter_context(open(args.router_log, "wb")) if args.router_log else None
                        url = running.enter_context(vllm_router(workers, *router_logging(log), log=log))
                    results[name] = run_agents(url, "sirllm", args.conversations, args.turns, args.max_tokens)
        finally:
            server.stop()

    for name, run in results.items():
        print(
            f"{name:>22}: {run['generated_tokens_per_second']:6.1f} generated tokens/s, turn p50 "
            f"{run['turn_latency_p50']:5.2f} s, p95 {run['turn_latency_p95']:5.2f} s, "
            f"prompt reused {run['reused_share']:.0%}, wall {run['wall_seconds']:.0f} s"
        )
    replies = [[r["reply"] for r in run["per_request"]] for run in results.values()]
    print("same replies in both:", all(r == replies[0] for r in replies))
    if args.json:
        figures = {name: {k: v for k, v in run.items() if k != "per_request"} for name, run in results.items()}
        Path(args.json).write_text(json.dumps({"arguments": vars(args), "results": figures}, indent=1))


def router_logging(log) -> list[str]:
    return ["--log-level", "info"] if log is not None else []


if __name__ == "__main__":
    main()
