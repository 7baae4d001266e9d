"""``sirllm-agents bench structured``: how often the model's grammar-constrained JSON replies come out complete.

Generated prompts for five schemas (flat strings, a nested object, arrays, enums with an integer range, an array of
objects with an optional key), each decoded greedily under ``response_format`` with a bound of ``max_new_tokens``,
under several decoding variants: no repetition penalty, candidate penalties, and the library's defaults. A reply is
*complete* when it parses as JSON and holds every required key, at every level; the share of complete replies comes
with its Wilson 95% interval, beside the finish reasons (``stop``: the grammar ended; ``closed``: the value was closed
within the budget, see ``sirllm_agents.closing``; ``length``: cut off).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from sirllm_agents import Engine
from sirllm_agents.constrained import json_schema_constraint
from sirllm_agents.penalties import NO_PENALTIES, Penalties
from sirllm_agents.replies import messages_as_held

_STRING = {"type": "string"}

SCHEMAS: dict[str, dict] = {
    "joke": {
        "type": "object",
        "properties": {"setup": _STRING, "punchline": _STRING},
        "required": ["setup", "punchline"],
    },
    "person": {
        "type": "object",
        "properties": {
            "name": _STRING,
            "age": {"type": "integer"},
            "address": {
                "type": "object",
                "properties": {"city": _STRING, "country": _STRING},
                "required": ["city", "country"],
            },
        },
        "required": ["name", "age", "address"],
    },
    "recipe": {
        "type": "object",
        "properties": {
            "title": _STRING,
            "ingredients": {"type": "array", "items": _STRING, "minItems": 1},
            "steps": {"type": "array", "items": _STRING, "minItems": 1},
        },
        "required": ["title", "ingredients", "steps"],
    },
    "review": {
        "type": "object",
        "properties": {
            "product": _STRING,
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "summary": _STRING,
        },
        "required": ["product", "sentiment", "rating", "summary"],
    },
    "event": {
        "type": "object",
        "properties": {
            "title": _STRING,
            "attendees": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": _STRING, "role": {"enum": ["host", "guest", "speaker"]}},
                    "required": ["name", "role"],
                },
                "minItems": 1,
            },
            "notes": _STRING,
        },
        "required": ["title", "attendees"],
    },
}

_TOPICS = (
    "cats",
    "dogs",
    "coffee",
    "robots",
    "pirates",
    "teachers",
    "bananas",
    "computers",
    "moons",
    "penguins",
    "trains",
    "doctors",
    "pizza",
    "wizards",
    "bicycles",
    "elephants",
    "programmers",
    "rain",
    "books",
    "ghosts",
    "chess",
    "astronauts",
    "cheese",
    "owls",
    "farmers",
    "music",
    "clocks",
    "sharks",
    "painters",
    "snow",
    "dentists",
    "frogs",
    "kings",
    "mirrors",
    "bakers",
    "lions",
    "umbrellas",
    "spiders",
    "ninjas",
    "soup",
    "pilots",
    "tomatoes",
    "dinosaurs",
    "libraries",
    "horses",
    "scientists",
    "tea",
    "vampires",
    "gardens",
    "rivers",
)
# Held apart from the measured prompts: the candidate penalties were compared on these, so the figures reported
# come from prompts no choice was made on.
TUNING_TOPICS = (
    "volcanoes",
    "bees",
    "pianos",
    "sailors",
    "deserts",
    "candles",
    "firefighters",
    "lemons",
    "kites",
    "glaciers",
)
_SUBJECTS = {
    "joke": ("Tell me a joke about {}.", _TOPICS),
    "person": ("Describe a fictional person who loves {}.", _TOPICS),
    "recipe": ("Give me a short recipe for a dish that {} would like.", _TOPICS),
    "review": ("Write a short review of a product for {}.", _TOPICS),
    "event": ("Plan a small party about {}, with two or three attendees.", _TOPICS),
}

# name -> (penalties given to every call, whether the reply is closed within the budget). "plain": none at all,
# the decoding before this benchmark; "defaults": what the library does when asked nothing.
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "plain": ({name: getattr(NO_PENALTIES, name) for name in Penalties.names()}, False),
    "repeat-1.1": ({"repeat_penalty": 1.1}, False),
    "repeat-1.2": ({"repeat_penalty": 1.2}, False),
    "frequency-0.5": ({"frequency_penalty": 0.5}, False),
    "presence-0.5": ({"presence_penalty": 0.5}, False),
    "dry-0.8": ({"dry_multiplier": 0.8}, False),
    "dry-1.5": ({"dry_multiplier": 1.5}, False),
    "dry-3": ({"dry_multiplier": 3.0}, False),
    "dry-0.8-repeat-1.1": ({"dry_multiplier": 0.8, "repeat_penalty": 1.1}, False),
    "defaults-unclosed": ({}, False),
    "defaults": ({}, True),
}


def prompts(schema: str, count: int, tuning: bool = False) -> list[str]:
    """``count`` prompts for ``schema``, the same on every run (from :data:`TUNING_TOPICS` when ``tuning``)."""
    template, topics = _SUBJECTS[schema]
    topics = TUNING_TOPICS if tuning else topics
    return [template.format(topics[i % len(topics)]) for i in range(count)]


def complete(value: Any, schema: dict) -> bool:
    """Whether ``value`` holds every key ``schema`` requires, at every level."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        return all(complete(v, properties[k]) for k, v in value.items() if k in properties)
    if isinstance(value, list) and "items" in schema:
        return all(complete(item, schema["items"]) for item in value)
    return schema.get("type") != "object"


def parsed_complete(text: str, schema: dict) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return complete(value, schema)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a share (95% for the default ``z``)."""
    if n == 0:
        return 0.0, 1.0
    share = successes / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_variant(
    engine: Engine,
    variant: str,
    count: int,
    max_new_tokens: int,
    schemas: list[str],
    progress: Callable[[], None] = lambda: None,
    tuning: bool = False,
) -> dict:
    """One variant over ``count`` prompts of each schema: per reply its schema, prompt, text, finish reason and
    completeness; and the summary."""
    options, closing = VARIANTS[variant]
    rows = []
    for name in schemas:
        schema = SCHEMAS[name]
        response_format = {"type": "json_schema", "schema": schema}
        for prompt in prompts(name, count, tuning):
            messages = [{"role": "user", "content": prompt}]
            session = engine.session(cache_size=1024)
            start = time.perf_counter()
            if closing:
                reply = session.chat(
                    messages, response_format=response_format, max_new_tokens=max_new_tokens, **options
                )
            else:  # the same request with the value's closing turned off
                constraint = json_schema_constraint(engine.model, schema, close_at_limit=False)
                held = messages_as_held(messages, response_format)
                reply = session.chat(held, constraint=constraint, max_new_tokens=max_new_tokens, **options)
            seconds = time.perf_counter() - start
            finish = "closed" if reply.closed_at_limit else reply.finish_reason
            rows.append(
                {
                    "schema": name,
                    "prompt": prompt,
                    "text": reply.text,
                    "finish_reason": finish,
                    "complete": parsed_complete(reply.text, schema),
                    "tokens": len(reply.token_ids),
                    "seconds": seconds,
                }
            )
            progress()
    return {"variant": variant, "options": options, "closing": closing, **summarize(rows), "replies": rows}


def summarize(rows: list[dict]) -> dict:
    done = sum(r["complete"] for r in rows)
    low, high = wilson(done, len(rows))
    finish: dict[str, int] = {}
    for r in rows:
        finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + 1
    per_schema = {}
    for name in dict.fromkeys(r["schema"] for r in rows):
        of = [r for r in rows if r["schema"] == name]
        per_schema[name] = sum(r["complete"] for r in of) / len(of)
    tokens = sorted(r["tokens"] for r in rows)
    return {
        "n": len(rows),
        "complete": done,
        "share": done / len(rows) if rows else 0.0,
        "interval": [low, high],
        "finish_reasons": finish,
        "per_schema": per_schema,
        "median_tokens": tokens[len(tokens) // 2] if tokens else 0,
        "seconds": sum(r["seconds"] for r in rows),
    }


def run(
    backend: str,
    variants: list[str],
    count: int,
    max_new_tokens: int,
    threads: int,
    schemas: list[str] | None = None,
    progress: Callable[[str], Callable[[], None]] = lambda label: lambda: None,
    tuning: bool = False,
) -> dict:
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}: expected some of {', '.join(VARIANTS)}")
    schemas = schemas or list(SCHEMAS)
    engine = Engine(backend=backend)
    runs = [run_variant(engine, variant, count, max_new_tokens, schemas, progress(variant)) for variant in variants]
    return {
        "task": "structured",
        "model": engine.model.name,
        "backend": engine.model.backend.name,
        "prompts_per_schema": count,
        "prompt_set": "tuning" if tuning else "measured",
        "schemas": schemas,
        "max_new_tokens": max_new_tokens,
        "threads": threads,
        "runs": runs,
    }


def table(results: dict) -> str:
    """The summary as a markdown table."""
    lines = [
        f"{results['model']} on {results['backend']}: {results['prompts_per_schema']} prompts x "
        f"{len(results['schemas'])} schemas, max_new_tokens {results['max_new_tokens']}",
        "",
        "| variant | complete | 95% interval | stop / closed / length | " + " | ".join(results["schemas"]) + " |",
        "|---|---|---|---|" + "---|" * len(results["schemas"]),
    ]
    for run in results["runs"]:
        f = run["finish_reasons"]
        low, high = run["interval"]
        schemas = " | ".join(f"{run['per_schema'].get(s, 0):.0%}" for s in results["schemas"])
        lines.append(
            f"| {run['variant']} | {run['complete']}/{run['n']} ({run['share']:.1%}) | {low:.1%} - {high:.1%} | "
            f"{f.get('stop', 0)} / {f.get('closed', 0)} / {f.get('length', 0)} | {schemas} |"
        )
    return "\n".join(lines) + "\n"
