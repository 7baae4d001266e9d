"""Core benchmark: what the session costs over a bare decode loop, and what each turn prefills.

1. Decode speed: the session's decode loop (scoring every token, stop checks, streaming text, eviction) against a
   bare greedy loop over ``model(...)`` with a transformers ``DynamicCache``, same prompt and token count,
   alternated and repeated; medians and their ratio. Target: session overhead <= 5%.
2. Prefill per turn: over a 50-turn conversation, tokens the session prefilled each turn against the tokens that
   turn's new messages add to the rendered conversation. Target: equal on every turn.

    python benchmarks/core_overhead.py [--model PATH] [--tokens 64] [--repeats 5] [--turns 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from sirllm_agents import Engine

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


@torch.no_grad()
def bare_decode_seconds_per_token(engine: Engine, tokens: int) -> float:
    ids = engine.encode(engine.template.render(PROMPT, add_generation_prompt=True))
    cache = DynamicCache()
    out = engine.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    token = out.logits[0, -1].argmax()
    start = time.perf_counter()
    for _ in range(tokens):
        out = engine.model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
        token = out.logits[0, -1].argmax()
    return (time.perf_counter() - start) / tokens


def session_decode(engine: Engine, tokens: int, cache_size: int) -> tuple[float, int]:
    """Seconds per token of the session's decode loop, and how many tokens it decoded."""
    reply = engine.session(cache_size=cache_size, policy="sirllm", recent_size=0).chat(PROMPT, max_new_tokens=tokens)
    return reply.stats.decode_seconds / reply.stats.generated_tokens, reply.stats.generated_tokens


def decode_overhead(engine: Engine, tokens: int, repeats: int) -> None:
    bare, roomy, evicting = [], [], []
    for _ in range(repeats):
        per_token, decoded = session_decode(engine, tokens, cache_size=1024)
        roomy.append(per_token)
        evicting.append(session_decode(engine, tokens, cache_size=64)[0])
        # Greedy decoding of the same prompt: the bare loop decodes the very tokens the session did.
        bare.append(bare_decode_seconds_per_token(engine, decoded))
    print(f"decode: {decoded} tokens, {repeats} alternated repeats, medians")
    base = statistics.median(bare)
    print(f"  bare model loop + DynamicCache   {1 / base:7.1f} tok/s")
    for name, times in (("session, no eviction", roomy), ("session, evicting (cache 64)", evicting)):
        per_token = statistics.median(times)
        print(f"  {name:32} {1 / per_token:7.1f} tok/s   overhead {100 * (per_token / base - 1):+.1f}%")


def prefill_per_turn(engine: Engine, turns: int) -> None:
    session = engine.session(cache_size=1024)
    messages: list[dict] = []
    equal = 0
    prefilled_total = new_total = 0
    for turn in range(turns):
        before = len(engine.encode(engine.template.render(messages, False))) if messages else 0
        messages.append({"role": "user", "content": f"Step {turn}: the sensor reads {turn * 13 % 97} degrees. Noted?"})
        new_tokens = len(engine.encode(engine.template.render(messages, True))) - before
        reply = session.chat(messages, max_new_tokens=12)
        messages.append({"role": "assistant", "content": reply.text})
        equal += reply.stats.prefilled_tokens == new_tokens
        prefilled_total += reply.stats.prefilled_tokens
        new_total += new_tokens
    print(f"prefill: {turns} turns, prefilled == new tokens on {equal}/{turns} turns")
    print(f"  prefilled {prefilled_total} tokens in all, new tokens {new_total}; restarts {session.stats.restarts};")
    print(f"  a stateless loop would have prefilled {sum_of_prompts(engine, messages)} tokens")


def sum_of_prompts(engine: Engine, messages: list[dict]) -> int:
    return sum(len(engine.encode(engine.template.render(messages[: i + 1], True))) for i in range(0, len(messages), 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--turns", type=int, default=50)
    args = parser.parse_args()
    engine = Engine(args.model)
    print(f"model {engine.model_name}, {torch.get_num_threads()} threads")
    decode_overhead(engine, args.tokens, args.repeats)
    prefill_per_turn(engine, args.turns)


if __name__ == "__main__":
    main()
