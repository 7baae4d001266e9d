"""ChatSirLLM on a tiny random model: message conversion, usage figures, cache reuse across calls, tool calls sent
back, streaming, async serialization, cancellation, timeouts and errors."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_sirllm import ChatSirLLM
from langchain_sirllm.chat_models import _to_chat_message
from pydantic import BaseModel


@tool
def set_level(level: int) -> str:
    """Set the level, 0 to 9."""
    return f"level {level}"


LEVEL_TOOL = {
    "type": "function",
    "function": {
        "name": "set_level",
        "description": "Set the level, 0 to 9.",
        "parameters": {
            "type": "object",
            "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["level"],
        },
    },
}


@pytest.fixture
def llm(tiny_engine) -> ChatSirLLM:
    return ChatSirLLM(engine=tiny_engine, max_tokens=8)


# -- messages ---------------------------------------------------------------------------------------------------


def test_message_conversion():
    assert _to_chat_message(SystemMessage("Be brief."), 0) == {"role": "system", "content": "Be brief."}
    assert _to_chat_message(HumanMessage([{"type": "text", "text": "a"}, "b"]), 0) == {"role": "user", "content": "ab"}
    assert _to_chat_message(ChatMessage(role="human", content="hi"), 0) == {"role": "user", "content": "hi"}
    assert _to_chat_message(ToolMessage("3", tool_call_id="c1", name="add"), 0) == {
        "role": "tool",
        "content": "3",
        "tool_call_id": "c1",
        "name": "add",
    }
    ai = AIMessage(
        [{"type": "text", "text": "some text"}, {"type": "tool_use", "id": "c1", "name": "add", "input": {"a": 1}}],
        tool_calls=[{"name": "add", "args": {"a": 1}, "id": "c1", "type": "tool_call"}],
    )
    assert _to_chat_message(ai, 0) == {
        "role": "assistant",
        "content": "some text",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}],
    }


def test_images_and_unknown_roles_are_refused_clearly():
    image = HumanMessage([{"type": "text", "text": "What is this?"}, {"type": "image", "base64": "AAAA"}])
    with pytest.raises(ValueError, match=r"messages\[3\]: ChatSirLLM runs a text-only model and cannot take 'image'"):
        _to_chat_message(image, 3)
    with pytest.raises(ValueError, match=r"messages\[0\]: unsupported chat message role 'critic'"):
        _to_chat_message(ChatMessage(role="critic", content="no"), 0)


def test_our_own_tool_call_sent_back_reuses_the_cache_and_an_edited_one_restarts(llm):
    # No adapter-side key: the session recognises its own reply in the form LangChain sends it back.
    bound = llm.bind_tools([LEVEL_TOOL], tool_choice="any")
    question = HumanMessage("Set the level to 3.")
    call = bound.invoke([question], max_tokens=40)
    assert call.additional_kwargs == {}
    ingested = llm.session.transcript.length
    again = bound.invoke([question, call, HumanMessage("Once more.")], max_tokens=40)
    assert again.response_metadata["restarts"] == 0
    assert again.usage_metadata["input_token_details"]["cache_read"] == ingested
    # Edited since (say by a human-in-the-loop step): the edited call is what is sent, so the session starts over.
    level = call.tool_calls[0]["args"]["level"]
    edited = call.model_copy(update={"tool_calls": [{**call.tool_calls[0], "args": {"level": (level + 1) % 10}}]})
    assert _to_chat_message(edited, 0)["tool_calls"][0]["function"]["arguments"] == {"level": (level + 1) % 10}
    assert (
        bound.invoke([question, edited, HumanMessage("Once more.")], max_tokens=40).response_metadata["restarts"] == 1
    )


# -- parameters -------------------------------------------------------------------------------------------------


def test_ls_params_and_identifying_params(tiny_engine):
    llm = ChatSirLLM(engine=tiny_engine, temperature=0.5, max_tokens=10, stop=["END"], cache_size=256)
    assert llm._get_ls_params() == {
        "ls_provider": "sirllm",
        "ls_model_name": tiny_engine.model.name,
        "ls_model_type": "chat",
        "ls_temperature": 0.5,
        "ls_max_tokens": 10,
        "ls_stop": ["END"],
    }
    assert ChatSirLLM()._get_ls_params(model="other")["ls_model_name"] == "other"
    assert ChatSirLLM().model_name == "SmolLM2-135M-Instruct"  # known without loading the model
    assert llm._identifying_params["cache_size"] == 256


def test_bind_tools_checks_tool_choice(llm):
    with pytest.raises(
        ValueError,
        match=r"tool_choice must be 'auto', 'none', 'any', 'required' or one of the tool "
        r"names \['set_level'\], got 'get_weather'",
    ):
        llm.bind_tools([set_level], tool_choice="get_weather")
    assert (
        llm.bind_tools([set_level], tool_choice=True).kwargs["tool_choice"] == "required"
    )  # one normaliser, OpenAI's word
    named = {"type": "function", "function": {"name": "set_level"}}
    assert llm.bind_tools([set_level], tool_choice=named).kwargs["tool_choice"] == "set_level"


def test_unknown_call_arguments_are_an_error(llm):
    with pytest.raises(TypeError, match=r"ChatSirLLM got unexpected call arguments: \['logit_bias'\]"):
        llm.invoke("hi", logit_bias={"1": 5.0})


# -- calls ------------------------------------------------------------------------------------------------------


def test_usage_and_response_metadata_and_cache_reuse(llm):
    first = llm.invoke("Hello")
    assert llm.session.stats.turns == 1
    usage = first.usage_metadata
    prompt = llm.session.model.template.render([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert usage["input_tokens"] == len(llm.session.model.encode(prompt))
    assert 0 < usage["output_tokens"] <= 8  # max_tokens
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_token_details"] == {"cache_read": 0}
    assert first.response_metadata["model_name"] == llm.model_name
    assert first.response_metadata["finish_reason"] in ("stop", "length")
    assert first.response_metadata["cache_size"] == 1024

    ingested = llm.session.transcript.length
    second = llm.invoke([HumanMessage("Hello"), first, HumanMessage("Again.")])
    # Everything of the first call (its reply included) is read from the cache; only the new turn is prefilled.
    assert second.usage_metadata["input_token_details"]["cache_read"] == ingested
    assert second.response_metadata["restarts"] == 0
    assert second.response_metadata["prefilled_tokens"] == second.usage_metadata["input_tokens"] - ingested


def test_required_tool_call_and_its_result_extend_the_same_session(llm):
    bound = llm.bind_tools([LEVEL_TOOL], tool_choice="any")
    question = HumanMessage("Set the level to 3.")
    call = bound.invoke([question], max_tokens=40)
    assert [c["name"] for c in call.tool_calls] == ["set_level"]
    assert 0 <= call.tool_calls[0]["args"]["level"] <= 9
    assert call.content == ""
    assert call.response_metadata["finish_reason"] == "tool_calls"

    ingested = llm.session.transcript.length
    result = ToolMessage("done", tool_call_id=call.tool_calls[0]["id"], name="set_level")
    answer = llm.bind_tools([LEVEL_TOOL]).invoke([question, call, result])
    assert answer.response_metadata["restarts"] == 0
    assert answer.usage_metadata["input_token_details"]["cache_read"] == ingested


def test_stream_gives_the_invoke_reply_in_pieces(tiny_engine):
    invoked = ChatSirLLM(engine=tiny_engine, max_tokens=12).invoke("Tell me a story.")
    chunks = list(ChatSirLLM(engine=tiny_engine, max_tokens=12).stream("Tell me a story."))
    assert len(chunks) > 2
    assert "".join(c.content for c in chunks) == invoked.content
    assert [c.chunk_position for c in chunks] == [None] * (len(chunks) - 1) + ["last"]
    assert [c.usage_metadata is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    full = sum(chunks[1:], chunks[0])
    assert full.usage_metadata == invoked.usage_metadata


def test_stop_sequences_cut_the_reply(tiny_engine):
    text = ChatSirLLM(engine=tiny_engine, max_tokens=16).invoke("Hi").content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    cut = ChatSirLLM(engine=tiny_engine, max_tokens=16).invoke("Hi", stop=[stop])
    assert cut.content == text[: text.find(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"


def test_structured_output_json_schema(tiny_engine):
    schema = {
        "title": "Choice",
        "type": "object",
        "properties": {"pick": {"enum": ["red", "blue"]}, "sure": {"type": "boolean"}},
        "required": ["pick", "sure"],
    }
    llm = ChatSirLLM(engine=tiny_engine, max_tokens=40)
    result = llm.with_structured_output(schema).invoke("Pick a colour.")
    assert list(result) == ["pick", "sure"] and result["pick"] in ("red", "blue")
    raw = llm.with_structured_output(schema, method="function_calling", include_raw=True).invoke("Pick a colour.")
    assert raw["parsing_error"] is None and raw["parsed"]["pick"] in ("red", "blue")
    assert raw["raw"].tool_calls[0]["name"] == "Choice"


def test_structured_output_on_the_agents_conversation_leaves_its_cache_as_it_was(tiny_engine):
    """An extraction over the agent's conversation runs one-off, on a session it drops afterwards: the agent's next
    call continues from its cache as if the extraction had not run, and the pool keeps no extra session. (Its JSON
    instructions go in the system message, so no held conversation is a prefix of it: it prefills everything.)"""
    llm = ChatSirLLM(engine=tiny_engine, max_tokens=8)
    conversation = [HumanMessage("My favourite colour is blue.")]
    conversation.append(llm.invoke(conversation))
    held, cached = llm.session.transcript.length, llm.session.cache.token_ids.tolist()
    live = sorted(tiny_engine.pool.live_ids())
    schema = {"title": "Colour", "type": "object", "properties": {"pick": {"enum": ["red", "blue"]}}}
    for method in ("json_schema", "function_calling"):
        extraction = llm.with_structured_output(schema, method=method, include_raw=True).invoke(
            [*conversation, HumanMessage("Which colour?")]
        )
        assert extraction["raw"].response_metadata["session_id"] != llm.session.session_id
    assert llm.session.cache.token_ids.tolist() == cached
    assert sorted(tiny_engine.pool.live_ids()) == live
    follow_up = llm.invoke([*conversation, HumanMessage("And mine?")])
    assert follow_up.usage_metadata["input_token_details"]["cache_read"] == held
    assert follow_up.response_metadata["restarts"] == 0


class Choice(BaseModel):
    pick: Literal["red", "blue"]


def test_structured_output_cut_off_reports_a_parsing_error_with_include_raw(tiny_engine):
    out = ChatSirLLM(engine=tiny_engine, max_tokens=2).with_structured_output(Choice, include_raw=True).invoke("Pick.")
    assert out["parsed"] is None and out["parsing_error"] is not None
    assert out["raw"].response_metadata["finish_reason"] == "length"


def test_timeout_raises_and_rolls_back(tiny_engine):
    llm = ChatSirLLM(engine=tiny_engine, max_tokens=50, timeout=0.0)
    with pytest.raises(TimeoutError, match=r"ChatSirLLM: the reply took longer than timeout=0.0 s"):
        llm.invoke("Hello")
    assert llm.session.stats.turns == 0
    assert [m["role"] for m in llm.session.transcript.messages] == ["user"]


async def test_concurrent_async_calls_are_serialized(tiny_engine):
    prompts = ["Hello", "Name a colour.", "What is 2+2?"]
    expected = [ChatSirLLM(engine=tiny_engine, max_tokens=8).invoke(p).content for p in prompts]
    llm = ChatSirLLM(engine=tiny_engine, max_tokens=8)
    replies = await asyncio.gather(*(llm.ainvoke(p) for p in prompts))
    assert [r.content for r in replies] == expected
    assert llm.session.stats.turns == 3


async def test_astream_left_early_rolls_the_reply_back(tiny_engine):
    llm = ChatSirLLM(engine=tiny_engine, max_tokens=30)
    async for _ in llm.astream("Tell me a story."):
        break
    await asyncio.to_thread(llm.session.reset)  # waits for the worker to let go of the session
    assert llm.session.stats.turns == 0
    full = None
    async for chunk in llm.astream("Tell me a story."):
        full = chunk if full is None else full + chunk
    assert full.chunk_position == "last" and llm.session.stats.turns == 1
    assert json.dumps(full.usage_metadata)  # plain data


def test_repetition_penalties_as_fields_and_call_arguments(tiny_engine):
    messages = [{"role": "user", "content": "Say something."}]
    penalised = tiny_engine.session().chat(messages, max_new_tokens=24, repeat_penalty=0.2, repeat_last_n=-1)
    plain = tiny_engine.session().chat(messages, max_new_tokens=24)
    assert penalised.content != plain.content
    fields = ChatSirLLM(engine=tiny_engine, max_tokens=24, repeat_penalty=0.2, repeat_last_n=-1)
    assert fields.invoke("Say something.").content == penalised.content
    call = ChatSirLLM(engine=tiny_engine, max_tokens=24)
    assert call.invoke("Say something.", repeat_penalty=0.2, repeat_last_n=-1).content == penalised.content
    with pytest.raises(ValueError, match="frequency_penalty must be between -2 and 2"):
        ChatSirLLM(engine=tiny_engine, frequency_penalty=3.0).invoke("hi")


class Joke(BaseModel):
    setup: str
    punchline: str


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_is_closed_within_max_tokens_or_raises_never_partial(tiny_engine, method):
    # 40 tokens: too few for the tiny model's rambling strings, enough for the closing, so the value is closed.
    joke = ChatSirLLM(engine=tiny_engine, max_tokens=40).with_structured_output(Joke, method=method).invoke("Joke?")
    assert isinstance(joke, Joke)
    # 3 tokens: not even the smallest Joke fits; the reply is cut off and that is an error, not a partial object.
    short = ChatSirLLM(engine=tiny_engine, max_tokens=3)
    with pytest.raises(OutputParserException, match="cut off by max_tokens"):
        short.with_structured_output(Joke, method=method).invoke("Joke?")
    with pytest.raises(OutputParserException, match="cut off by max_tokens"):
        short.with_structured_output(Joke.model_json_schema(), method=method).invoke("Joke?")
    raw = short.with_structured_output(Joke, method=method, include_raw=True).invoke("Joke?")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], OutputParserException)
    assert raw["raw"].response_metadata["finish_reason"] == "length"
