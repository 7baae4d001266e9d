"""Batched decoding on llama.cpp: N conversations decoding together in one shared context against the same N decoding
one after another, each in a context of its own (today's path), on the same prompts and greedy tokens.

For each model, thread count and N in 1, 2, 4, 8: every conversation is prefilled (not timed), then decodes
``--tokens`` greedy tokens; the two ways alternate ``--repeats`` times and the medians are compared within the run.
Each run also checks that both ways decoded the same tokens.

The models: the embedded SmolLM2-135M (Q4_1) or ``--model``, and the same weights re-quantized to Q4_0 (unless
``--no-q4_0``): ggml's CPU backend multiplies Q4_0 weights by several tokens at once with matrix kernels, but Q4_1
weights one token at a time, so only the first gains from batching.

    python benchmarks/batched_decode.py [--model PATH] [--tokens 32] [--repeats 3] [--threads 1 2] [--no-q4_0]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp

from sirllm_agents.loading import embedded_model_path, gguf_tokenizer
from sirllm_agents.runners.llamacpp import LlamaCppBackend, LlamaCppRunner, decode_together

TOPICS = ["lighthouses", "volcanoes", "bees", "trains", "glaciers", "chess", "tea", "comets"]
COUNTS = (1, 2, 4, 8)
CAPACITY = 256  # cache cells per conversation: room for a prompt and the reply


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


def requantized_to_q4_0(path: Path, folder: str) -> Path:
    """A copy of the GGUF at ``path`` with its weights re-quantized to Q4_0 (by llama.cpp, in a few seconds)."""
    out = Path(folder) / f"{path.stem}.Q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not re-quantize {path} to Q4_0")
    return out


def compare(path: Path, threads: int, tokens: int, repeats: int) -> None:
    tokenizer = gguf_tokenizer(path)
    backend = LlamaCppBackend(path, threads=threads)
    print(f"\n{path.name}, {threads} thread(s)")
    print("  conversations   one after another   together   together / one after another   same tokens")
    for n in COUNTS:
        ids = prompts(tokenizer, n)
        serial, together, same = [], [], True
        for _ in range(repeats):
            seconds, serial_replies = decode_one_after_another(backend, ids, tokens, CAPACITY)
            serial.append(seconds)
            seconds, together_replies = decode_in_one_context(backend, ids, tokens, CAPACITY)
            together.append(seconds)
            same = same and serial_replies == together_replies
        serial_rate, together_rate = n * tokens / statistics.median(serial), n * tokens / statistics.median(together)
        print(
            f"  {n:13}   {serial_rate:11.1f} tok/s   {together_rate:6.1f} tok/s   "
            f"{together_rate / serial_rate:29.2f}x   {'yes' if same else 'NO'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens each conversation decodes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-q4_0", action="store_true", help="skip the Q4_0 re-quantization")
    args = parser.parse_args()
    path = Path(args.model) if args.model else embedded_model_path()
    print(f"{args.tokens} tokens per conversation, medians of {args.repeats} alternated runs")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as folder:
        models = [path] if args.no_q4_0 else [path, requantized_to_q4_0(path, folder)]
        for model in models:
            for threads in args.threads:
                compare(model, threads, args.tokens, args.repeats)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
