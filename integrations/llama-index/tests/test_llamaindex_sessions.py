"""SirLLM chat calls that name a conversation (``session_id=``, as a field or a call keyword) run on the engine's
pooled session of that id; calls that name none keep to the LLM's own session."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.llms.sirllm import SirLLM

from sirllm_agents import Engine

SETTINGS = dict(max_new_tokens=5, cache_size=128, decay=0.9)


@pytest.fixture
def pooled(engine: Engine, tmp_path) -> Engine:
    """An engine with a pool of its own on the shared embedded model, one live session at most."""
    return Engine(engine.model, tokenizer=engine.model.tokenizer, max_live_sessions=1, spill_dir=tmp_path)


def user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


def serial_replies(engine: Engine, script: list[str]) -> list[str]:
    llm = SirLLM(engine=engine, **SETTINGS)
    history: list[ChatMessage] = []
    for text in script:
        history.append(user(text))
        history.append(llm.chat(history).message)
    return [m.content for m in history[1::2]]


SCRIPTS = {"ada": ["My name is Ada.", "What is my name?"], "bo": ["I like tea.", "What do I like?"]}


def test_interleaved_conversations_by_call_keyword_match_serial_runs(pooled):
    expected = {name: serial_replies(pooled, script) for name, script in SCRIPTS.items()}
    llm = SirLLM(engine=pooled, **SETTINGS)
    history: dict[str, list[ChatMessage]] = {name: [] for name in SCRIPTS}
    for turn in range(2):
        for name, script in SCRIPTS.items():  # one live session: the other is spilled to disk and read back
            history[name].append(user(script[turn]))
            response = llm.chat(history[name], session_id=name)
            assert response.message.content == expected[name][turn]
            figures = response.raw["sirllm"]
            assert figures["session_id"] == name and figures["cache_size"] == 128 and figures["restarts"] == 0
            assert turn == 0 or figures["reused_tokens"] > 0
            history[name].append(response.message)
    pooled_ids = pooled.pool.live_ids() + pooled.pool.spilled_ids()
    assert {"ada", "bo"} <= set(pooled_ids) and llm._session_id not in pooled_ids  # its own session: never made
    assert pooled.route([], "ada").config.decay == 0.9  # made with the LLM's settings


def test_session_id_field_drives_a_chat_engine_on_the_pooled_session(pooled):
    llm = SirLLM(engine=pooled, session_id="user-7", **SETTINGS)
    chat_engine = SimpleChatEngine.from_defaults(llm=llm)
    chat_engine.chat("My name is Ada.")
    chat_engine.chat("What is my name?")
    assert llm.session is pooled.route([], "user-7")
    assert llm.stats.turns == 2 and llm.stats.restarts == 0
    # Another SirLLM naming the same id continues the same conversation from its cache.
    other = SirLLM(engine=pooled, session_id="user-7", **SETTINGS)
    history = chat_engine.chat_history + [user("Thanks.")]
    ingested = llm.session.transcript.length
    reply = other.chat(history)
    assert reply.raw["sirllm"]["restarts"] == 0 and reply.raw["sirllm"]["reused_tokens"] == ingested
    assert other.stats.turns == 3
    other.reset()
    assert llm.session.transcript.length == 0  # one session: reset through either


@pytest.mark.asyncio
async def test_stream_and_async_calls_route_by_keyword(pooled):
    expected = serial_replies(pooled, SCRIPTS["ada"][:1])[0]
    llm = SirLLM(engine=pooled, **SETTINGS)
    chunks = list(llm.stream_chat([user(SCRIPTS["ada"][0])], session_id="s-stream"))
    assert chunks[-1].message.content == expected and chunks[-1].raw["sirllm"]["session_id"] == "s-stream"
    replies = await asyncio.gather(*(llm.achat([user(SCRIPTS["ada"][0])], session_id=f"s-{i}") for i in range(2)))
    assert [r.message.content for r in replies] == [expected] * 2
    chunks = [c async for c in await llm.astream_chat([user(SCRIPTS["ada"][0])], session_id="s-astream")]
    assert chunks[-1].message.content == expected and chunks[-1].raw["sirllm"]["session_id"] == "s-astream"


def test_bad_session_ids_are_clear_errors(pooled):
    llm = SirLLM(engine=pooled, **SETTINGS)
    with pytest.raises(ValueError, match="session_id must be a non-empty string, got ''"):
        llm.chat([user("Hi")], session_id="")
    with pytest.raises(ValueError, match="session_id"):
        SirLLM(engine=pooled, session_id="")
    with pytest.raises(TypeError, match="completions run one-off, on no chat session"):
        llm.complete("Hi", session_id="x")
    assert pooled.pool.live_ids() == [] and llm.stats.turns == 0
