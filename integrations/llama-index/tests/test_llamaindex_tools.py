"""SirLLM's function calling on the embedded model: FunctionAgent, predict_and_call, structured output, tool_choice."""

from __future__ import annotations

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.sirllm import SirLLM
from pydantic import BaseModel


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str
    age: int


def multiply_tool(calls: list[tuple[int, int]]) -> FunctionTool:
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        calls.append((a, b))
        return a * b

    return FunctionTool.from_defaults(multiply)


@pytest.fixture
def tool_llm(engine) -> SirLLM:
    return SirLLM(engine=engine, max_new_tokens=48, cache_size=1024)


@pytest.mark.asyncio
async def test_function_agent_runs_the_required_tool_call_and_answers(tool_llm):
    calls: list[tuple[int, int]] = []
    agent = FunctionAgent(
        tools=[multiply_tool(calls)],
        llm=tool_llm,
        initial_tool_choice="multiply",  # the first step must call it: grammar-constrained decoding
        system_prompt="You are a calculator.",
    )
    response = await agent.run("What is 6 times 7?")
    assert calls == [(6, 7)]  # the tool ran with the arguments parsed from the call
    assert str(response).strip() == "42"
    first, second = tool_llm.session.transcript.messages[2], tool_llm.session.transcript.messages[4]
    assert first["content"] == ""  # the call is held structured, as the template renders it back
    assert [call["function"] for call in first["tool_calls"]] == [{"name": "multiply", "arguments": {"a": 6, "b": 7}}]
    assert second["content"].strip() == "42"
    stats = tool_llm.stats
    assert (stats.turns, stats.restarts) == (2, 0)  # the answer step extended the tool-call step's cache
    assert stats.reused_tokens > 200


def test_predict_and_call_with_tool_required(tool_llm):
    calls: list[tuple[int, int]] = []
    response = tool_llm.predict_and_call([multiply_tool(calls)], user_msg="What is 3 times 5?", tool_required=True)
    assert calls == [(3, 5)]
    assert response.response == "15"
    assert response.sources[0].tool_name == "multiply"


def test_predict_and_call_by_default_constrains_decoding_to_a_call(tool_llm):
    """Its default error_on_no_tool_call=True treats a missing call as an error, so a call is required, not hoped for
    (on the embedded model the unconstrained reply is prose and LlamaIndex raised "expected at least one tool
    call")."""
    calls: list[tuple[int, int]] = []
    response = tool_llm.predict_and_call([multiply_tool(calls)], user_msg="What is 3 times 5?")
    assert len(calls) == 1 and response.sources[0].tool_name == "multiply"
    assert response.response == str(calls[0][0] * calls[0][1])


def test_chat_with_tools_fills_tool_calls_and_tool_selections(tool_llm):
    calls: list[tuple[int, int]] = []
    tool = multiply_tool(calls)
    response = tool_llm.chat_with_tools([tool], user_msg="Multiply 4 by 9.", tool_required=True)
    (call,) = response.message.additional_kwargs["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "multiply", "arguments": {"a": 4, "b": 9}}
    assert response.message.content == ""  # the call itself is taken out of the text
    (selection,) = tool_llm.get_tool_calls_from_response(response)
    assert (selection.tool_id, selection.tool_name, selection.tool_kwargs) == (call["id"], "multiply", {"a": 4, "b": 9})
    assert calls == []  # chat_with_tools only selects; nothing ran


def test_no_tool_call_and_tool_choice_errors(tool_llm):
    tool = multiply_tool([])
    plain = tool_llm.chat_with_tools([tool], user_msg="Say hi.", tool_choice="none", max_new_tokens=4)
    assert "tool_calls" not in plain.message.additional_kwargs
    assert tool_llm.get_tool_calls_from_response(plain, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="expected at least one tool call, but the reply has none"):
        tool_llm.get_tool_calls_from_response(plain)
    with pytest.raises(ValueError, match=r"one of the tool names \['multiply'\], got 'divide'"):
        tool_llm.chat_with_tools([tool], user_msg="hi", tool_choice="divide")
    with pytest.raises(ValueError, match=r"cut off at max_new_tokens=5: raise max_new_tokens. Reply so far: '<tool"):
        tool_llm.chat_with_tools([tool], user_msg="Multiply 4 by 9.", tool_required=True, max_new_tokens=5)
    with pytest.raises(ValueError, match="tool_choice='required' needs tools"):
        tool_llm.chat([ChatMessage(role="user", content="hi")], tool_choice="required")


def test_single_tool_call_unless_parallel_allowed(tool_llm):
    two = [{"id": f"c{i}", "type": "function", "function": {"name": "multiply", "arguments": {}}} for i in (1, 2)]

    def response() -> ChatResponse:
        return ChatResponse(message=ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": two}))

    assert len(tool_llm._validate_chat_with_tools_response(response(), []).message.additional_kwargs["tool_calls"]) == 1
    kept = tool_llm._validate_chat_with_tools_response(response(), [], allow_parallel_tool_calls=True)
    assert len(kept.message.additional_kwargs["tool_calls"]) == 2


def test_structured_predict_is_constrained_and_leaves_the_chat_session_alone(tool_llm):
    prompt = PromptTemplate("Extract the person: {text}")
    person = tool_llm.structured_predict(Person, prompt, text="Ada is 36 years old.")
    assert isinstance(person, Person) and person.age == 36
    assert tool_llm.stats.turns == 0  # ran on the side session
    structured = tool_llm.as_structured_llm(Person)
    response = structured.chat([ChatMessage(role="user", content="Extract the person: Bob is 7 years old.")])
    assert isinstance(response.raw, Person) and response.raw.age == 7
    assert Person.model_validate_json(response.message.content) == response.raw
    assert tool_llm.stats.turns == 0


@pytest.mark.asyncio
async def test_astructured_predict(tool_llm):
    person = await tool_llm.astructured_predict(
        Person, PromptTemplate("Extract the person: {text}"), text="Ada is 36 years old."
    )
    assert isinstance(person, Person) and person.age == 36
    assert tool_llm.stats.turns == 0


@pytest.mark.asyncio
async def test_react_agent_runs_a_tool_step_end_to_end(engine):
    # ReAct is prompted, not constrained: one worked example shows the 135M model the format, and "Observation:" ends
    # its turn. The second step is the last (max_iterations=2): the agent then asks for the answer ("generate").
    from llama_index.core.agent.workflow import ReActAgent, ToolCallResult

    example = [
        ChatMessage(role="user", content="What is 2 times 3?"),
        ChatMessage(
            role="assistant",
            content="Thought: I need to use a tool to help me answer the question.\nAction: multiply\n"
            'Action Input: {"a": 2, "b": 3}',
        ),
        ChatMessage(role="user", content="Observation: 6"),
        ChatMessage(role="assistant", content="Thought: I can answer without using any more tools.\nAnswer: 6"),
    ]
    llm = SirLLM(engine=engine, max_new_tokens=40, cache_size=2048, stop=["Observation:"])
    calls: list[tuple[int, int]] = []
    agent = ReActAgent(tools=[multiply_tool(calls)], llm=llm, early_stopping_method="generate")
    handler = agent.run("What is 6 times 7?", chat_history=example, max_iterations=2)
    results = [event async for event in handler.stream_events() if isinstance(event, ToolCallResult)]
    response = await handler
    assert calls[0] == (6, 7)
    assert (results[0].tool_name, results[0].tool_kwargs, str(results[0].tool_output)) == (
        "multiply",
        {"a": 6, "b": 7},
        "42",
    )
    assert str(response).strip()


def test_structured_predict_closes_within_the_budget_or_raises(engine):
    prompt = PromptTemplate("Extract the person: {text}")
    closed = SirLLM(engine=engine, max_new_tokens=34, cache_size=1024)  # the smallest call: 30
    person = closed.structured_predict(Person, prompt, text="Ada Lovelace, the mathematician, is 36 years old.")
    assert isinstance(person, Person)
    short = SirLLM(engine=engine, max_new_tokens=4, cache_size=1024)
    with pytest.raises(ValueError, match="cut off at max_new_tokens=4"):
        short.structured_predict(Person, prompt, text="Ada is 36 years old.")
