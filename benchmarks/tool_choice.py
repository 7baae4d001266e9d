"""Does the model choose to call a tool under ``tool_choice="auto"``, and only when it should?

Three sets of one-turn conversations with tools bound: 12 requests a bound tool answers (the weather in San Francisco
among them, as in LangChain's ``test_agent_loop``), 12 that need no tool (the same tools bound), and the first set
again after the call was made and its result came back (where the agent should answer, not call again). Per set it
prints how often the greedy reply is a tool call, with a Wilson 95% interval, and the median probability the model
gives ``<tool_call>`` as its reply's start (``Session.score``): how far the model is from choosing a call. (For a
model whose vocabulary has ``<tool_call>`` as one added token, as Qwen2.5's, that probability is of its spelling in
ordinary tokens, which the model never writes: only the call counts compare.)

    python benchmarks/tool_choice.py [--model FILE.gguf] [--backend llamacpp|torch] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

from sirllm_agents import Engine
from sirllm_agents.tools import TOOL_CALL_START


def _tool(name: str, description: str, **parameters: str) -> dict:
    properties = {key: {"type": kind} for key, kind in parameters.items()}
    schema = {"type": "object", "properties": properties, "required": list(parameters)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


WEATHER = _tool("get_weather", "Get the weather at a location.", location="string")
STOCK = _tool("get_stock_price", "Get the latest price of a stock.", ticker="string")
CURRENCY = _tool(
    "convert_currency", "Convert money between currencies.", amount="number", source="string", target="string"
)
FLIGHTS = _tool(
    "search_flights", "Search flights between two cities.", origin="string", destination="string", date="string"
)
TIME = _tool("get_time", "Get the current time in a time zone.", timezone="string")
EMAIL = _tool("send_email", "Send an email.", to="string", subject="string", body="string")
ORDER = _tool("lookup_order", "Look up the status of an order.", order_id="string")
CALCULATOR = _tool("calculator", "Evaluate an arithmetic expression.", expression="string")
WEB = _tool("search_web", "Search the web.", query="string")

NEEDS_A_TOOL = [
    ([WEATHER], "What is the weather in San Francisco, CA?"),
    ([STOCK], "What's Apple's stock price right now?"),
    ([CURRENCY], "How much is 100 dollars in euros today?"),
    ([FLIGHTS], "Find me a flight from Boston to Denver on May 3."),
    ([TIME], "What time is it in Tokyo right now?"),
    ([EMAIL], "Email bob@example.com that the meeting moved to 3pm."),
    ([ORDER], "Where is my order 88123?"),
    ([CALCULATOR], "What is 3457 times 982?"),
    ([WEATHER, STOCK], "Will it rain in London tomorrow?"),
    ([WEB], "Who won yesterday's football match between Spain and Italy?"),
    ([WEATHER, TIME], "Is it cold in Oslo now?"),
    ([STOCK, CURRENCY], "What is Tesla trading at?"),
]
NEEDS_NO_TOOL = [
    ([WEATHER], "Hello! How are you?"),
    ([STOCK], "Tell me a joke about cats."),
    ([TIME], "What is the capital of France?"),
    ([EMAIL], "Write a haiku about autumn."),
    ([WEATHER], "Translate 'good morning' into Spanish."),
    ([CALCULATOR], "Thanks, that's all for today."),
    ([ORDER], "What does a cat eat?"),
    ([WEB], "Say hi."),
    ([FLIGHTS], "What is your name?"),
    ([CURRENCY], "Give me a synonym for happy."),
    ([WEATHER, STOCK], "Who are you?"),
    ([TIME, EMAIL], "How do I boil an egg?"),
]


def after_the_result(tools: list[dict], request: str) -> list[dict]:
    """``request``, the call of its first tool (every argument "Paris") and that call's result."""
    function = tools[0]["function"]
    arguments = json.dumps({key: "Paris" for key in function["parameters"]["properties"]})
    call = {"id": "call_1", "type": "function", "function": {"name": function["name"], "arguments": arguments}}
    return [
        {"role": "user", "content": request},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Done: 42."},
    ]


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    centre = (hits + z * z / 2) / (n + z * z)
    half = z * math.sqrt(hits * (n - hits) / n + z * z / 4) / (n + z * z)
    return max(0.0, centre - half), min(1.0, centre + half)


def measure(engine: Engine, cases: list[tuple[list[dict], list[dict]]]) -> dict:
    calls, starts = 0, []
    for tools, messages in cases:
        starts.append(math.exp(engine.session(cache_size=1024).score(messages, [TOOL_CALL_START], tools=tools)[0]))
        reply = engine.session(cache_size=1024).chat(messages, tools=tools, tool_choice="auto", max_new_tokens=48)
        calls += bool(reply.tool_calls)
    return {
        "calls": calls,
        "n": len(cases),
        "interval": wilson(calls, len(cases)),
        "median_p": statistics.median(starts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file or model folder (default: the embedded model)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    engine = Engine(args.model, backend=args.backend, threads=args.threads)
    sets = {
        "needs a tool": [(tools, [{"role": "user", "content": text}]) for tools, text in NEEDS_A_TOOL],
        "needs no tool": [(tools, [{"role": "user", "content": text}]) for tools, text in NEEDS_NO_TOOL],
        "after the result": [(tools, after_the_result(tools, text)) for tools, text in NEEDS_A_TOOL],
    }
    print(f"{engine.model.name} on {engine.model.backend.name}, tool_choice='auto', greedy:")
    print("| conversations | greedy reply is a call | 95% interval | median p('<tool_call>' first) |")
    print("| --- | ---: | --- | ---: |")
    for label, cases in sets.items():
        m = measure(engine, cases)
        low, high = m["interval"]
        print(f"| {label} | {m['calls']}/{m['n']} | [{low:.2f}, {high:.2f}] | {m['median_p']:.2g} |", flush=True)


if __name__ == "__main__":
    main()
