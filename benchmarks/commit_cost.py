"""What committing every turn to Redis costs, on the embedded SmolLM2-135M: per turn, the bytes written and the time
of ``RedisStore.commit`` (exporting the session, encoding it as a session file, the fenced Lua write), against the
turn's own time, as the cache fills up to ``--cache-size`` and then stays bounded.

It starts its own ``redis-server`` on 127.0.0.1 (a free port, a temporary folder, ``appendonly yes`` with
``appendfsync everysec``, Redis' default with AOF), plays one conversation of ``--turns`` turns (a user message of
about 60 tokens and a greedy reply of ``--max-new-tokens``), and prints one line per turn and the medians.

    python benchmarks/commit_cost.py [--backend auto|torch|llamacpp] [--turns 12] [--cache-size 1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the tests' redis-server starter

from redis_fixtures import RedisServer

from sirllm_agents import Engine, SessionConfig
from sirllm_agents.redis_store import RedisStore

FILLER = (
    "Here is the next part of the log: job {n} of the nightly pipeline finished in {s} seconds, wrote {k} records, "
    "and reported no warnings. Summarise it in one short sentence."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--cache-size", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the per-turn figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder), appendfsync="everysec")
        server.start()
        try:
            store = RedisStore(server.url, owner="bench")
            engine = Engine(backend=args.backend, config=SessionConfig(cache_size=args.cache_size), store=store)
            rows = play(engine, store, args.turns, args.max_new_tokens)
        finally:
            server.stop()
    print(f"backend {engine.model.identity['backend']}, cache_size {args.cache_size}")
    for row in rows:
        print(
            f"turn {row['turn']:2d}: cache {row['cache_len']:4d} tokens, turn {row['turn_ms']:7.1f} ms, "
            f"commit {row['commit_ms']:6.1f} ms, {row['commit_bytes'] / 1e6:6.2f} MB"
        )
    for name in ("commit_ms", "commit_bytes", "turn_ms"):
        print(f"median {name}: {statistics.median(row[name] for row in rows):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"backend": args.backend, "rows": rows}, indent=1))


def play(engine: Engine, store: RedisStore, turns: int, max_new_tokens: int) -> list[dict]:
    messages, rows = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": FILLER.format(n=turn, s=30 + turn, k=1000 + 37 * turn)})
        started = time.perf_counter()
        reply = engine.chat(messages, "bench", max_new_tokens=max_new_tokens)
        elapsed = time.perf_counter() - started
        size, seconds = store.last_commit
        rows.append(
            {
                "turn": turn + 1,
                "cache_len": reply.stats.cache_len,
                "turn_ms": elapsed * 1000,
                "commit_ms": seconds * 1000,
                "commit_bytes": size,
            }
        )
        messages.append(reply.as_message())
    return rows


if __name__ == "__main__":
    main()
