"""A 100-turn conversation through a LlamaIndex chat engine on the embedded model.

The chat engine sends the whole history every turn; SirLLM prefills only the new message, and SirLLM eviction keeps
the KV cache at ``cache_size`` tokens however long the conversation grows. The fact given in turn 1 is asked for at
the end.

    python examples/llamaindex_chat.py [--turns 100] [--cache-size 256] [--max-new-tokens 12]
"""

from __future__ import annotations

import argparse
import time

from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.llms.sirllm import SirLLM

FACT = "My name is Ada and my cat is called Pixel."
QUESTION = "What is my cat called?"
SMALL_TALK = [
    "Tell me a fun fact about the sea.",
    "What is a good breakfast?",
    "Name a famous painter.",
    "Give me a word that rhymes with moon.",
    "What colour is the sky at dusk?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()

    llm = SirLLM(cache_size=args.cache_size, max_new_tokens=args.max_new_tokens)
    chat = SimpleChatEngine.from_defaults(llm=llm, system_prompt="You are a friendly, brief assistant.")
    stats = llm.session.stats
    start = time.perf_counter()
    for turn in range(1, args.turns + 1):
        if turn == 1:
            message = FACT
        elif turn == args.turns:
            message = QUESTION
        else:
            message = SMALL_TALK[turn % len(SMALL_TALK)]
        prefilled, restarts = stats.prefilled_tokens, stats.restarts
        answer = chat.chat(message).response
        if turn in (1, 2, args.turns) or turn % 10 == 0:
            print(
                f"turn {turn:3d}: prefilled {stats.prefilled_tokens - prefilled:4d} new tokens, "
                f"conversation {llm.session.transcript.length:6d} tokens, cache {stats.cache_len:4d}/{args.cache_size}"
                f", restarts {stats.restarts - restarts}"
            )
        if turn in (1, args.turns):
            print(f"    user: {message}\n    assistant: {answer}")
    print(
        f"{args.turns} turns in {time.perf_counter() - start:.0f} s: {stats.prefilled_tokens} tokens prefilled, "
        f"{stats.reused_tokens} reused from the cache, {stats.evicted_tokens} evicted; "
        f"'Pixel' recalled: {'Pixel' in answer}"
    )


if __name__ == "__main__":
    main()
