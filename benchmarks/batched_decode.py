"""Batched decoding: N conversations decoding together (``decode_together``) against the same N decoding one after
another, each on a runner of its own (today's path), on the same prompts and greedy tokens.

For each model, thread count and N in 1, 2, 4, 8: every conversation is prefilled (not timed), then decodes
``--tokens`` greedy tokens; the two ways alternate ``--repeats`` times and the medians are compared within the run,
by wall time and by the process's CPU time (steadier on a machine other jobs share). Each run also checks that both
ways decoded the same tokens.

The models: on llama.cpp the embedded SmolLM2-135M (Q4_1) or ``--model``, and the same weights re-quantized to Q4_0
(unless ``--no-q4_0``): ggml's CPU backend multiplies Q4_0 weights by several tokens at once with matrix kernels, but
Q4_1 weights one token at a time, so only the first gains from batching. ``--backends torch`` runs the embedded model
on PyTorch (float32).

    python benchmarks/batched_decode.py [--model PATH] [--tokens 32] [--repeats 3] [--threads 1 2] [--no-q4_0]
                                        [--backends llamacpp torch]
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
import torch

from sirllm_agents.loading import embedded_model_path, embedded_tokenizer, gguf_tokenizer
from sirllm_agents.runners import Backend, ModelRunner
from sirllm_agents.runners.llamacpp import LlamaCppBackend

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


def new_runners(backend: Backend, n: int, together: bool) -> list[ModelRunner]:
    """``n`` runners; on llama.cpp, for decoding together, sequences of one shared context."""
    if together and isinstance(backend, LlamaCppBackend):
        shared = backend.shared_context(n, CAPACITY)
        return [shared.new_runner() for _ in range(n)]
    return [backend.new_runner(CAPACITY) for _ in range(n)]


def decode(backend: Backend, ids: list[list[int]], tokens: int, together: bool):
    """Wall and CPU seconds to decode ``tokens`` greedy tokens per conversation, together or one conversation after
    another, and the tokens."""
    runners = new_runners(backend, len(ids), together)
    if together:
        backend.decode_together(runners, ids)
    else:
        for runner, prompt in zip(runners, ids):
            runner.ingest(prompt)
    replies: list[list[int]] = [[] for _ in ids]
    wall, cpu = time.perf_counter(), time.process_time()
    if together:
        for _ in range(tokens):
            step = [int(runner.logits.argmax()) for runner in runners]
            for reply, token in zip(replies, step):
                reply.append(token)
            backend.decode_together(runners, [[token] for token in step])
    else:
        for runner, reply in zip(runners, replies):
            for _ in range(tokens):
                reply.append(int(runner.logits.argmax()))
                runner.ingest(reply[-1:])
    return time.perf_counter() - wall, time.process_time() - cpu, replies


def compare(name: str, backend: Backend, tokenizer, tokens: int, repeats: int) -> None:
    print(f"\n{name}")
    print("  conversations   one after another   together     together / one after another   same tokens")
    print("                  (wall)              (wall)       wall     CPU time")
    for n in COUNTS:
        ids = prompts(tokenizer, n)
        alone_wall, alone_cpu, together_wall, together_cpu, same = [], [], [], [], True
        for _ in range(repeats):
            wall, cpu, alone_replies = decode(backend, ids, tokens, together=False)
            alone_wall.append(wall)
            alone_cpu.append(cpu)
            wall, cpu, together_replies = decode(backend, ids, tokens, together=True)
            together_wall.append(wall)
            together_cpu.append(cpu)
            same = same and alone_replies == together_replies
        alone_rate = n * tokens / statistics.median(alone_wall)
        together_rate = n * tokens / statistics.median(together_wall)
        cpu_ratio = statistics.median(alone_cpu) / statistics.median(together_cpu)
        print(
            f"  {n:13}   {alone_rate:11.1f} tok/s   {together_rate:6.1f} tok/s   "
            f"{together_rate / alone_rate:5.2f}x   {cpu_ratio:5.2f}x       {'yes' if same else 'NO'}"
        )


def requantized_to_q4_0(path: Path, folder: str) -> Path:
    """A copy of the GGUF at ``path`` with its weights re-quantized to Q4_0 (by llama.cpp, in a few seconds)."""
    out = Path(folder) / f"{path.stem}.Q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not re-quantize {path} to Q4_0")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens each conversation decodes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-q4_0", action="store_true", help="skip the Q4_0 re-quantization")
    parser.add_argument("--backends", nargs="+", choices=["llamacpp", "torch"], default=["llamacpp"])
    args = parser.parse_args()
    path = Path(args.model) if args.model else embedded_model_path()
    print(f"{args.tokens} tokens per conversation, medians of {args.repeats} alternated runs")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if "llamacpp" in args.backends:
        with tempfile.TemporaryDirectory() as folder:
            for model in [path] if args.no_q4_0 else [path, requantized_to_q4_0(path, folder)]:
                for threads in args.threads:
                    backend = LlamaCppBackend(model, threads=threads)
                    name = f"llama.cpp, {model.name}, {threads} thread(s)"
                    compare(name, backend, gguf_tokenizer(model), args.tokens, args.repeats)
    if "torch" in args.backends:
        from sirllm_agents import Engine

        backend = Engine(backend="torch").model.backend
        for threads in args.threads:
            torch.set_num_threads(threads)
            compare(f"PyTorch, float32, {threads} thread(s)", backend, embedded_tokenizer(), args.tokens, args.repeats)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
