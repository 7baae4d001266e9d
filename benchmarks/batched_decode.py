"""Batched decoding: N conversations decoding together (``decode_together``) against the same N decoding one after
another, each on a runner of its own (today's path), on the same prompts and greedy tokens.

For each model, thread count and N in 1, 2, 4, 8: every conversation is prefilled (not timed), then decodes
``--tokens`` greedy tokens both ways in lockstep (each step timed both ways, in alternating order, so both meet the
same load on a machine other jobs share); medians of ``--repeats`` runs, compared by wall and by the process's CPU
time. Each run also checks that both ways decoded the same tokens.

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
WAYS = ("alone", "together")


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


def decode_both_ways(backend: Backend, ids: list[list[int]], tokens: int) -> dict[str, tuple[float, float, list]]:
    """Decode ``tokens`` greedy tokens per conversation both ways in lockstep, so that both meet the same load: each
    step times the together call for every conversation and the one-after-another calls, in alternating order.
    Returns per way the wall and CPU seconds and the replies."""
    runners = {way: new_runners(backend, len(ids), together=way == "together") for way in WAYS}
    backend.decode_together(runners["together"], ids)
    for runner, prompt in zip(runners["alone"], ids):
        runner.ingest(prompt)
    wall, cpu = dict.fromkeys(WAYS, 0.0), dict.fromkeys(WAYS, 0.0)
    replies: dict[str, list[list[int]]] = {way: [[] for _ in ids] for way in WAYS}
    for step in range(tokens):
        for way in WAYS if step % 2 == 0 else WAYS[::-1]:
            started, started_cpu = time.perf_counter(), time.process_time()
            chosen = [int(runner.logits.argmax()) for runner in runners[way]]
            for reply, token in zip(replies[way], chosen):
                reply.append(token)
            if way == "together":
                backend.decode_together(runners[way], [[token] for token in chosen])
            else:
                for runner, token in zip(runners[way], chosen):
                    runner.ingest([token])
            wall[way] += time.perf_counter() - started
            cpu[way] += time.process_time() - started_cpu
    return {way: (wall[way], cpu[way], replies[way]) for way in WAYS}


def compare(name: str, backend: Backend, tokenizer, tokens: int, repeats: int) -> None:
    print(f"\n{name}")
    print("  conversations   one after another   together     together / one after another   same tokens")
    print("                  (wall)              (wall)       wall     CPU time")
    for n in COUNTS:
        ids = prompts(tokenizer, n)
        runs = [decode_both_ways(backend, ids, tokens) for _ in range(repeats)]
        wall = {way: statistics.median(run[way][0] for run in runs) for way in WAYS}
        cpu = {way: statistics.median(run[way][1] for run in runs) for way in WAYS}
        same = all(run["alone"][2] == run["together"][2] for run in runs)
        alone_rate, together_rate = n * tokens / wall["alone"], n * tokens / wall["together"]
        cpu_ratio = cpu["alone"] / cpu["together"]
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
    print(f"{args.tokens} tokens per conversation, medians of {args.repeats} runs")
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
