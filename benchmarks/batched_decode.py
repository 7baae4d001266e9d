"""Batched decoding on llama.cpp: N conversations decoding together in one shared context against the same N decoding
one after another, each in a context of its own (today's path), on the same prompts and greedy tokens.

For each thread count and N in 1, 2, 4, 8: every conversation is prefilled (not timed), then decodes ``--tokens``
greedy tokens; the two ways alternate ``--repeats`` times and the medians are compared within the run. Each run
also checks that both ways decoded the same tokens.

    python benchmarks/batched_decode.py [--model PATH] [--tokens 32] [--repeats 3] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from sirllm_agents.loading import embedded_model_path, gguf_tokenizer
from sirllm_agents.runners.llamacpp import LlamaCppBackend, LlamaCppRunner, decode_together

TOPICS = ["lighthouses", "volcanoes", "bees", "trains", "glaciers", "chess", "tea", "comets"]
COUNTS = (1, 2, 4, 8)


def prompts(tokenizer, n: int) -> list[list[int]]:
    """``n`` different chat prompts of a few dozen tokens."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Tell me three facts about {topic}, one per line."}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for topic in TOPICS[:n]
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def decode_one_after_another(backend: LlamaCppBackend, ids: list[list[int]], tokens: int, capacity: int):
    """Seconds to decode ``tokens`` greedy tokens for each conversation in turn, and the tokens."""
    runners = [backend.new_runner(capacity) for _ in ids]
    for runner, prompt in zip(runners, ids):
        runner.ingest(prompt)
    replies = []
    start = time.perf_counter()
    for runner in runners:
        reply = []
        for _ in range(tokens):
            reply.append(int(runner.logits.argmax()))
            runner.ingest(reply[-1:])
        replies.append(reply)
    return time.perf_counter() - start, replies


def decode_in_one_context(backend: LlamaCppBackend, ids: list[list[int]], tokens: int, capacity: int):
    """Seconds to decode ``tokens`` greedy tokens for all conversations together, and the tokens."""
    shared = backend.shared_context(len(ids), capacity)
    runners: list[LlamaCppRunner] = [shared.new_runner() for _ in ids]
    decode_together(runners, ids)
    replies: list[list[int]] = [[] for _ in ids]
    start = time.perf_counter()
    for _ in range(tokens):
        step = [int(runner.logits.argmax()) for runner in runners]
        for reply, token in zip(replies, step):
            reply.append(token)
        decode_together(runners, [[token] for token in step])
    return time.perf_counter() - start, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens each conversation decodes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    path = args.model or embedded_model_path()
    tokenizer = gguf_tokenizer(path)
    capacity = 256
    print(f"{os.path.basename(path)}, {args.tokens} tokens per conversation, medians of {args.repeats} alternated runs")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for threads in args.threads:
        backend = LlamaCppBackend(path, threads=threads)
        print(f"\n{threads} thread(s)")
        print("  conversations   one after another   together   together / one after another   same tokens")
        for n in COUNTS:
            ids = prompts(tokenizer, n)
            serial, together, same = [], [], True
            for _ in range(args.repeats):
                seconds, serial_replies = decode_one_after_another(backend, ids, args.tokens, capacity)
                serial.append(seconds)
                seconds, together_replies = decode_in_one_context(backend, ids, args.tokens, capacity)
                together.append(seconds)
                same = same and serial_replies == together_replies
            total = n * args.tokens
            serial_rate, together_rate = total / statistics.median(serial), total / statistics.median(together)
            print(
                f"  {n:13}   {serial_rate:11.1f} tok/s   {together_rate:6.1f} tok/s   "
                f"{together_rate / serial_rate:29.2f}x   {'yes' if same else 'NO'}"
            )
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
