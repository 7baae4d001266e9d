"""Speed and memory: one scripted agent loop, run by each peer in its own process on the same model weights.

Each step appends a ~60-token tool result (as a user message: ``ChatHuggingFace`` takes no tool messages) and asks
for a reply of at most 24 tokens, greedily. Peers:

* ``sirllm``: ``ChatSirLLM`` (``langchain_sirllm``) on the PyTorch backend (float32 weights dequantized from the
  GGUF): only the new messages are prefilled, into a bounded cache;
* ``sirllm-llamacpp``: the same on the llama.cpp backend (the GGUF's own Q4_1 weights);
* ``stateless``: ``ChatHuggingFace`` over a local ``HuggingFacePipeline`` (``langchain-huggingface``), which
  re-prefills the whole history every step;
* ``llamacpp``: ``llama-cpp-python`` on the GGUF file the embedded model ships in, which reuses the prompt prefix it
  evaluated last (optional: skipped when not installed).

Per step it records the latency, the resident memory and the history length; a peer that fails (for instance past
its context window) records the error and stops.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEERS = ("sirllm", "sirllm-llamacpp", "stateless", "llamacpp")
# The modules each peer imports beyond the library. The LangChain ones come with the bench extra (``bench`` checks
# them before any work); llama-cpp-python is optional (the library's ``llamacpp`` extra): its peer is skipped without.
PEER_NEEDS = {
    "sirllm": ["langchain_core", "langchain_sirllm"],
    "sirllm-llamacpp": ["langchain_core", "langchain_sirllm", "llama_cpp"],
    "stateless": ["langchain_core", "langchain_huggingface"],
    "llamacpp": ["llama_cpp"],
}
OPTIONAL_PEERS = ("sirllm-llamacpp", "llamacpp")
REPLY_TOKENS = 24
SYSTEM = "You are an order-tracking agent. After each tool result, state the next action in one short sentence."
TASK = "Track every order in my account and tell me what to do about each one."


def tool_result(step: int) -> str:
    """A deterministic tool result of about 60 tokens, different at every step."""
    return (
        f"Tool result {step}: lookup_order returned order #{1000 + step} with 3 items (blue ceramic mug, steel "
        f"kettle, oak tray), total {17 + step % 50}.{step % 100:02d} EUR, "
        f"status {('shipped', 'delayed', 'held')[step % 3]}, "
        f"carrier DHL, tracking JD{(step * 7919) % 10**8:08d}, delivery in {2 + step % 5} days."
    )


class Peer:
    """Replies to the whole conversation so far; ``backend`` says what runs it, ``overflow`` what happens when the
    history passes its context window."""

    backend: str
    overflow: str

    def reply(self, messages: list[dict]) -> str:
        raise NotImplementedError


class SirLLMPeer(Peer):
    def __init__(self, cache_size: int, backend: str, threads: int):
        from langchain_sirllm import ChatSirLLM

        from sirllm_agents.engine import Engine

        self.overflow = f"nothing: SirLLM evicts within a cache of {cache_size} tokens"
        engine = Engine(backend=backend, threads=threads)
        # The paper's policy: the peer stands for SirLLM as published (the library's default is a variant).
        self.chat = ChatSirLLM(
            engine=engine, max_tokens=REPLY_TOKENS, cache_size=cache_size, policy="sirllm", recent_size=0
        )
        self.backend = f"langchain_sirllm.ChatSirLLM on the {backend} backend"

    def reply(self, messages: list[dict]) -> str:
        return self.chat.invoke(_langchain_messages(messages)).content


class StatelessPeer(Peer):
    def __init__(self):
        import torch
        from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
        from transformers import pipeline

        from sirllm_agents.loading import load

        model, tokenizer, name = load(None, device="cpu", dtype=torch.float32)
        generate = pipeline(
            "text-generation",
            model=model,
            tokenizer=tokenizer,
            max_new_tokens=REPLY_TOKENS,
            do_sample=False,
            return_full_text=False,
        )
        self.chat = ChatHuggingFace(llm=HuggingFacePipeline(pipeline=generate, model_id=name), tokenizer=tokenizer)
        self.backend = "langchain_huggingface.ChatHuggingFace over HuggingFacePipeline (transformers)"
        self.overflow = (
            "nothing: it keeps re-prefilling the whole history, past the model's "
            f"{model.config.max_position_embeddings} trained positions"
        )

    def reply(self, messages: list[dict]) -> str:
        return self.chat.invoke(_langchain_messages(messages)).content


class LlamaCppPeer(Peer):
    def __init__(self, threads: int):
        from llama_cpp import Llama

        from sirllm_agents.loading import embedded_model_path

        self.llm = Llama(model_path=str(embedded_model_path()), n_ctx=0, n_threads=threads, seed=0, verbose=False)
        self.backend = "llama-cpp-python (prefix reuse of the last prompt)"
        self.overflow = f"error: the prompt may not pass n_ctx = {self.llm.n_ctx()} tokens"

    def reply(self, messages: list[dict]) -> str:
        out = self.llm.create_chat_completion(messages, max_tokens=REPLY_TOKENS, temperature=0.0)
        return out["choices"][0]["message"]["content"] or ""


def _langchain_messages(messages: list[dict]):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    return [kinds[m["role"]](content=m["content"]) for m in messages]


def make_peer(name: str, cache_size: int, threads: int) -> Peer:
    if name in ("sirllm", "sirllm-llamacpp"):
        return SirLLMPeer(cache_size, "torch" if name == "sirllm" else "llamacpp", threads)
    if name == "stateless":
        return StatelessPeer()
    return LlamaCppPeer(threads)


def available(name: str) -> str | None:
    """None when the peer can run here, else why not."""
    missing = [module for module in PEER_NEEDS[name] if importlib.util.find_spec(module) is None]
    if missing:
        fix = "sirllm-agents[llamacpp]" if name in OPTIONAL_PEERS else "sirllm-agents-apps[bench]"
        verb = "is" if len(missing) == 1 else "are"
        return f"skipped: {', '.join(missing)} {verb} not installed (pip install '{fix}')"
    return None


def loop(peer_name: str, steps: int, cache_size: int, threads: int, time_limit: float | None) -> dict:
    """Run the scripted loop with one peer in this process; returns per-step figures."""
    import psutil
    import torch
    from rich.progress import Progress

    from sirllm_agents.loading import embedded_tokenizer

    torch.set_num_threads(threads)
    tokenizer = embedded_tokenizer()  # only to count tokens: loading weights here would add to every peer's memory
    started = time.perf_counter()
    peer = make_peer(peer_name, cache_size, threads)
    result = {
        "peer": peer_name,
        "backend": peer.backend,
        "overflow": peer.overflow,
        "threads": threads,
        "load_seconds": round(time.perf_counter() - started, 2),
        "steps": [],
        "stopped": None,
    }
    process = psutil.Process()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"agent loop: {peer_name}", total=steps)
        for step in range(steps):
            messages.append({"role": "user", "content": tool_result(step)})
            start = time.perf_counter()
            try:
                text = peer.reply(messages)
            except Exception as error:
                result["stopped"] = f"error at step {step}: {type(error).__name__}: {str(error)[:200]}"
                break
            seconds = time.perf_counter() - start
            messages.append({"role": "assistant", "content": text})
            history = len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"])
            result["steps"].append(
                {
                    "seconds": seconds,
                    "rss_mib": process.memory_info().rss / 2**20,
                    "history_tokens": history,
                    "reply_tokens": len(tokenizer.encode(text)),
                }
            )
            progress.advance(bar)
            if time_limit is not None and time.perf_counter() - started > time_limit:
                result["stopped"] = f"time limit of {time_limit:.0f} s reached after step {step}"
                break
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run(peers: list[str], steps: int, cache_size: int, threads: int, time_limit: float | None) -> dict:
    """Each peer in a fresh process (so peak memory is its own), one after the other; returns all results."""
    results = {
        "task": "agent-loop",
        "steps": steps,
        "cache_size": cache_size,
        "threads": threads,
        "reply_tokens": REPLY_TOKENS,
        "peers": {},
    }
    for name in peers:
        why_not = available(name)
        if why_not:
            print(f"{name}: {why_not}")
            results["peers"][name] = {"peer": name, "skipped": why_not}
            continue
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "result.json"
            command = [
                sys.executable,
                "-m",
                "sirllm_agents_apps.bench.agent_loop",
                "--peer",
                name,
                "--steps",
                str(steps),
                "--cache-size",
                str(cache_size),
                "--threads",
                str(threads),
                "--json",
                str(out),
            ]
            if time_limit is not None:
                command += ["--time-limit", str(time_limit)]
            subprocess.run(command, check=True)
            results["peers"][name] = json.loads(out.read_text())
        peer = results["peers"][name]
        print(
            f"{name}: {peer['backend']}; {len(peer['steps'])} steps in {sum(s['seconds'] for s in peer['steps']):.1f} s"
            + (f"; {peer['stopped']}" if peer["stopped"] else "")
        )
    results["summary"] = summarize(results)
    return results


def summarize(results: dict) -> dict:
    """Total time, latency flatness, memory growth per peer, and the speed ratios the issue's targets ask for."""
    import statistics

    summary = {}
    for name, peer in results["peers"].items():
        steps = peer.get("steps")
        if not steps:
            continue
        seconds = [s["seconds"] for s in steps]
        entry = {
            "steps_done": len(steps),
            "total_seconds": sum(seconds),
            "peak_rss_mib": peer["peak_rss_mib"],
            "rss_growth_mib": steps[-1]["rss_mib"] - steps[min(9, len(steps) - 1)]["rss_mib"],
            "stopped": peer["stopped"],
        }
        if len(steps) >= 30:
            entry["flatness"] = statistics.median(seconds[-10:]) / statistics.median(seconds[10:20])
        # By tenths of the steps asked for, so peers that stopped early compare on the steps they did.
        tenths = [seconds[i * results["steps"] // 10 : (i + 1) * results["steps"] // 10] for i in range(10)]
        entry["decile_medians"] = [statistics.median(t) if t else None for t in tenths]
        summary[name] = entry
    base = summary.get("sirllm")
    for other in ("sirllm-llamacpp", "stateless", "llamacpp"):
        if base and other in summary:
            done = min(base["steps_done"], summary[other]["steps_done"])
            mine = sum(s["seconds"] for s in results["peers"]["sirllm"]["steps"][:done])
            theirs = sum(s["seconds"] for s in results["peers"][other]["steps"][:done])
            summary[f"{other}_over_sirllm"] = {"steps": done, "ratio": theirs / mine}
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one peer of the agent-loop benchmark (run by `bench agent-loop`)")
    parser.add_argument("--peer", choices=PEERS, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--cache-size", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--time-limit", type=float, default=None)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    result = loop(args.peer, args.steps, args.cache_size, args.threads, args.time_limit)
    Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
