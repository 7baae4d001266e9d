"""ChatSirLLM calls that name a conversation (run config ``configurable`` ``session_id`` / ``thread_id``, or a call
argument) run on the engine's pooled session of that id; calls that name none keep to the model's own session."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.runnables import RunnableLambda
from langchain_sirllm import ChatSirLLM

from sirllm_agents import Engine

SETTINGS = dict(max_tokens=6, cache_size=96, decay=0.9)  # small enough that the conversations below evict


@pytest.fixture
def engine(tiny_engine, tmp_path) -> Engine:
    """An engine with a pool of its own on the shared tiny model, holding at most two sessions in memory."""
    return Engine(tiny_engine.model, max_live_sessions=2, spill_dir=tmp_path)


def thread(thread_id: str) -> dict:
    return {"configurable": {"thread_id": thread_id}}


def serial_replies(engine: Engine, script: list[str]) -> list[str]:
    """One uninterrupted conversation on a model's own session, for comparison."""
    llm = ChatSirLLM(engine=engine, **SETTINGS)
    history: list[BaseMessage] = []
    for text in script:
        history.append(HumanMessage(text))
        history.append(llm.invoke(history))
    return [m.content for m in history[1::2]]


def test_thread_ids_route_interleaved_conversations_to_their_own_sessions(engine):
    scripts = {
        "alice": ["Hi, I am Alice.", "What is 2+2?", "Name a colour.", "Thanks."],
        "bob": ["Plan a trip to Rome.", "Which museums?", "And food?", "Budget?"],
        "carol": ["Write a haiku.", "Another one.", "About the sea.", "Shorter."],
    }
    expected = {name: serial_replies(engine, script) for name, script in scripts.items()}
    llm = ChatSirLLM(engine=engine, **SETTINGS)
    history: dict[str, list[BaseMessage]] = {name: [] for name in scripts}
    for turn in range(4):
        for name, script in scripts.items():  # three threads, two live sessions: each is spilled and read back
            history[name].append(HumanMessage(script[turn]))
            reply = llm.invoke(history[name], config=thread(name))
            assert reply.content == expected[name][turn], (name, turn)
            meta = reply.response_metadata
            assert meta["session_id"] == name and meta["cache_size"] == 96 and meta["cache_len"] <= 96
            assert meta["restarts"] == 0 and (turn == 0 or reply.usage_metadata["input_token_details"]["cache_read"])
            history[name].append(reply)
    pooled_ids = engine.pool.live_ids() + engine.pool.spilled_ids()
    assert set(scripts) <= set(pooled_ids)
    assert llm._session_id not in pooled_ids  # the model's own session was never needed, so never made
    pooled = engine.route([], "alice")
    assert (pooled.cache_size, pooled.config.decay) == (96, 0.9)  # made with the model's settings


def test_session_id_wins_over_thread_id_so_a_side_task_leaves_the_thread_alone(engine):
    llm = ChatSirLLM(engine=engine, **SETTINGS)
    history = [HumanMessage("Remember the number 7.")]
    history.append(llm.invoke(history, config=thread("t1")))
    ingested = engine.route([], "t1").transcript.length
    summary = llm.invoke(
        history + [HumanMessage("Summarise the conversation.")],
        config={"configurable": {"thread_id": "t1", "session_id": "t1-summary"}},
    )
    assert summary.response_metadata["session_id"] == "t1-summary"
    assert engine.route([], "t1").transcript.length == ingested  # the thread's session is as it was
    history.append(HumanMessage("Which number?"))
    reply = llm.invoke(history, config=thread("t1"))
    assert reply.response_metadata["restarts"] == 0
    assert reply.usage_metadata["input_token_details"]["cache_read"] == ingested


def test_other_ways_to_name_the_session(engine):
    llm = ChatSirLLM(engine=engine, **SETTINGS)
    assert llm.invoke("Hi", session_id="by-argument").response_metadata["session_id"] == "by-argument"
    assert llm.bind(session_id="bound").invoke("Hi").response_metadata["session_id"] == "bound"
    thread_uuid = uuid.uuid4()
    assert llm.invoke("Hi", config=thread(thread_uuid)).response_metadata["session_id"] == str(thread_uuid)
    # Inside a runnable (a LangGraph node, say) the enclosing run's config names the session.
    node = RunnableLambda(lambda text: llm.invoke(text))
    assert node.invoke("Hi", config=thread("from-node")).response_metadata["session_id"] == "from-node"
    chunks = list(llm.stream("Hi", config=thread("streamed")))
    assert chunks[-1].response_metadata["session_id"] == "streamed"
    # Without a name the call runs on the model's own session.
    own = llm.invoke("Hi")
    assert own.response_metadata["session_id"] == llm.session.session_id
    assert llm.session.session_id not in ("by-argument", "bound", "from-node", "streamed")


async def test_async_calls_route_by_thread_and_match_a_serial_run(engine):
    script = ["Hi, I am Alice.", "What is 2+2?"]
    expected = serial_replies(engine, script)
    llm = ChatSirLLM(engine=engine, **SETTINGS)

    async def conversation(thread_id: str) -> list[str]:
        history: list[BaseMessage] = []
        for text in script:
            history.append(HumanMessage(text))
            reply = await llm.ainvoke(history, config=thread(thread_id))
            history.append(reply)
        return [m.content for m in history[1::2]]

    results = await asyncio.gather(*(conversation(f"async-{i}") for i in range(3)))
    assert results == [expected] * 3
    streamed = None
    async for chunk in llm.astream("Hi, I am Alice.", config=thread("async-stream")):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.chunk_position == "last"
    assert streamed.content == expected[0] and streamed.response_metadata["session_id"] == "async-stream"


@pytest.mark.parametrize("bad", ["", 3.5, {"id": 1}, True])
def test_a_bad_session_id_is_a_clear_error(engine, bad):
    llm = ChatSirLLM(engine=engine, **SETTINGS)
    with pytest.raises(ValueError, match="must be a non-empty string, got"):
        llm.invoke("Hi", config=thread(bad))
    assert engine.pool.live_ids() == []
