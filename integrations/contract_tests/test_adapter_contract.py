"""The adapters' contract: each converts types and nothing more, so for the same call each gives what the core gives.

Every test runs against both adapters (``langchain-sirllm`` and ``llama-index-llms-sirllm``) on the embedded model,
and most compare against the core's own reply to the same messages, token for token."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

pytestmark = pytest.mark.slow


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class City(BaseModel):
    """A city and the country it is in."""

    name: str
    country: str


ASK = [{"role": "system", "content": "You are a calculator."}, {"role": "user", "content": "What is 6 times 7?"}]


def test_a_plain_reply_is_the_cores(driver):
    messages = [{"role": "user", "content": "Name three colours."}]
    answer = driver.call(messages)
    assert answer.content == driver.core_reply(messages).content
    assert answer.calls == []


def test_a_stream_joins_to_the_plain_reply(driver):
    messages = [{"role": "user", "content": "Name three colours."}]
    answer = driver.call(messages, stream=True)
    assert len(answer.pieces) > 1  # streamed in pieces, not held to the end
    assert "".join(answer.pieces) == answer.content == driver.core_reply(messages).content


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
def test_a_required_call_is_the_cores_and_never_shows_markup(driver, stream):
    answer = driver.call(ASK, tools=[multiply, add], tool_choice="required", stream=stream)
    reference = driver.core_reply(ASK, tools=driver.tool_specs([multiply, add]), tool_choice="required")
    assert answer.calls == [(call.name, call.arguments) for call in reference.tool_calls]
    assert len(answer.calls) == 1 and answer.content == ""
    assert not any("tool_call" in piece or "{" in piece for piece in answer.pieces)


def test_a_named_tool_choice_calls_that_tool(driver):
    answer = driver.call(ASK, tools=[multiply, add], tool_choice="add")
    ((name, arguments),) = answer.calls
    assert name == "add" and set(arguments) == {"a", "b"}
    assert all(isinstance(value, int) for value in arguments.values())


def test_tool_choice_none_reads_no_call(driver):
    answer = driver.call(ASK, tools=[multiply], tool_choice="none")
    reference = driver.core_reply(ASK, tools=driver.tool_specs([multiply]), tool_choice="none")
    assert answer.calls == [] and reference.tool_calls == []
    assert answer.content == reference.content


def test_structured_output_is_an_instance_of_the_schema(driver):
    city = driver.structured(City, "Paris is the capital of France. Which city is it, and in which country?")
    assert isinstance(city, City) and city.name and city.country


def test_a_tool_loop_reuses_the_cache_at_every_step(driver):
    """Call, tool result, answer: the adapter resends its own call in its framework's form, and the session takes it
    as the reply it already holds, so the second step prefills only the tool result."""
    first = driver.call(ASK, tools=[multiply], tool_choice="required")
    ((name, arguments),) = first.calls
    turn = [
        {
            "role": "assistant",
            "content": first.content,
            "tool_calls": [
                {"id": first.call_ids[0], "type": "function", "function": {"name": name, "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": first.call_ids[0], "content": str(multiply(**arguments))},
    ]
    second = driver.call(ASK + turn, tools=[multiply])
    stats = driver.session.stats
    assert (stats.turns, stats.restarts) == (2, 0)
    assert first.cached_tokens == 0
    assert second.cached_tokens >= first.prompt_tokens  # the whole first step, call included, came from the cache
    assert second.prompt_tokens - second.cached_tokens < 40  # only the tool result and the new turn's header


def test_a_changed_history_restarts_rather_than_answering_from_a_stale_cache(driver):
    driver.call([{"role": "user", "content": "My name is Ada."}])
    edited = [
        {"role": "user", "content": "My name is Bob."},
        {"role": "assistant", "content": "Hello Bob."},
        {"role": "user", "content": "What is my name?"},
    ]
    answer = driver.call(edited)
    assert driver.session.stats.restarts == 1
    assert answer.content == driver.core_reply(edited).content
