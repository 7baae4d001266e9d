"""A LangChain agent with two small tools, 50+ steps on the embedded SmolLM2-135M-Instruct, on one SirLLM session.

Step 1 gives a fact. The agent then works through its tools for many steps (each call is required and
grammar-constrained, so even the 135M model always writes a valid one), while the conversation grows far past the
KV cache. Per step it prints the tokens prefilled (only the new messages), reused from the cache, and evicted. At the
end it asks about the fact from step 1.

    python examples/langchain_agent.py [--steps 50] [--cache-size 512]
"""

from __future__ import annotations

import argparse

from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_sirllm import ChatSirLLM

FACT = "Remember this: my locker code is 4821."
QUESTION = "What is my locker code?"


@tool
def next_number(n: int) -> int:
    """Return the number after n."""
    return n + 1


@tool
def is_even(n: int) -> bool:
    """Whether n is even."""
    return n % 2 == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="tool-calling steps before the final question")
    parser.add_argument("--cache-size", type=int, default=512, help="KV cache budget in tokens")
    args = parser.parse_args()

    llm = ChatSirLLM(max_tokens=40, cache_size=args.cache_size)
    calls = 0

    @wrap_model_call
    def work_then_answer(request, handler):
        """Require a tool call for the first --steps model calls; after that, the model answers in text."""
        nonlocal calls
        calls += 1
        return handler(request.override(tool_choice="any" if calls <= args.steps else "none"))

    agent = create_agent(
        llm,
        tools=[next_number, is_even],
        system_prompt="You count upwards with next_number and check numbers with is_even.",
        middleware=[work_then_answer],
    )
    print(f"{'step':>4} {'prefilled':>9} {'reused':>7} {'evicted':>7} {'cache':>6}  reply")
    state = {"messages": [HumanMessage(FACT + " Now count from 1, checking each number.")]}
    state = agent.invoke(state, {"recursion_limit": 4 * args.steps + 10})
    printed = report(state["messages"], 0)
    state["messages"].append(HumanMessage(QUESTION))
    state = agent.invoke(state, {"recursion_limit": 10})
    report(state["messages"], printed)
    stats = llm.session.stats
    print(
        f"\n{stats.turns} model calls; {stats.prefilled_tokens} tokens prefilled, {stats.reused_tokens} reused, "
        f"{stats.evicted_tokens} evicted; the cache holds {stats.cache_len} of at most {args.cache_size}."
    )
    print(f"{QUESTION} -> {state['messages'][-1].content!r}")


def report(messages: list, printed: int) -> int:
    """Print one line per model reply after the first ``printed``; return how many replies there are."""
    replies = [m for m in messages if isinstance(m, AIMessage)]
    for step, reply in enumerate(replies[printed:], start=printed + 1):
        usage, meta = reply.usage_metadata, reply.response_metadata
        reused = usage["input_token_details"]["cache_read"]
        shown = ", ".join(f"{c['name']}({c['args']})" for c in reply.tool_calls) or repr(reply.content[:40])
        print(
            f"{step:>4} {usage['input_tokens'] - reused:>9} {reused:>7} {meta['evicted_tokens']:>7} "
            f"{meta['cache_len']:>6}  {shown}"
        )
    return len(replies)


if __name__ == "__main__":
    main()
