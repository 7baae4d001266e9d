"""The main job: a long scripted conversation on a small cache, under SirLLM and under StreamingLLM.

A fact is given at turn 1, sixty filler turns push it far past the cache budget, and the last turn asks for it. Per
turn it prints what was prefilled, reused and evicted and the cache length; at the end, each policy's answer and
whether the fact's tokens are still in the cache.
"""

from __future__ import annotations

from rich.console import Console

from .engine import Engine

FACT = "Remember this: my locker code is 4821."
QUESTION = "What is my locker code?"
FILLER = [
    "Name a fruit that is red.",
    "What colour is the sky on a clear day?",
    "Give me one word that rhymes with cat.",
    "How many legs does a spider have?",
    "What do bees make?",
    "Name a planet in our solar system.",
    "What is the opposite of hot?",
    "Which animal says moo?",
    "What do you call frozen water?",
    "Name a musical instrument with strings.",
]


def run_policy(engine: Engine, policy: str, turns: int, cache_size: int, console: Console) -> tuple[str, bool]:
    session = engine.session(cache_size=cache_size, policy=policy)
    console.rule(f"policy={policy}  cache_size={cache_size}")
    console.print(f"{'turn':>4} {'prefilled':>9} {'reused':>6} {'evicted':>7} {'cache':>5}  reply")
    messages = []
    prompts = [FACT] + [FILLER[i % len(FILLER)] for i in range(turns - 2)] + [QUESTION]
    for number, prompt in enumerate(prompts, start=1):
        messages.append({"role": "user", "content": prompt})
        reply = session.chat(messages, max_new_tokens=24)
        messages.append({"role": "assistant", "content": reply.text})
        s = reply.stats
        shown = reply.text.replace("\n", " ")
        shown = shown[:40] + ("…" if len(shown) > 40 else "")
        console.print(
            f"{number:>4} {s.prefilled_tokens:>9} {s.reused_tokens:>6} {s.evicted_tokens:>7} {s.cache_len:>5}  {shown}",
            markup=False,
            highlight=False,
        )
    kept_text = engine.tokenizer.decode(session.cache.token_ids.tolist())
    return messages[-1]["content"], "4821" in kept_text.replace(" ", "")


def main(turns: int = 62, cache_size: int = 256, model: str | None = None) -> None:
    console = Console()
    with console.status("loading the model"):
        engine = Engine(model)
    results = {policy: run_policy(engine, policy, turns, cache_size, console) for policy in ("sirllm", "streaming")}
    console.rule("the question at the last turn: " + QUESTION)
    for policy, (answer, kept) in results.items():
        console.print(f"[bold]{policy:>9}[/]: {answer!r}   (the fact's digits still in the cache: {'yes' if kept else 'no'})")
