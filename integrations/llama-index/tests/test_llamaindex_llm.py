"""SirLLM as a LlamaIndex LLM on the embedded model: metadata, chat engine cache reuse, streaming, async, usage,
the side session for completions, and bad input."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.llms.sirllm import UNBOUNDED_CONTEXT_WINDOW, SirLLM
from llama_index.llms.sirllm.utils import to_session_messages

SYSTEM = "You are a terse assistant."


def user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


def test_metadata_tells_llamaindex_not_to_trim_history(llm):
    meta = llm.metadata
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name == "SmolLM2-135M-Instruct"
    assert meta.num_output == 6
    assert meta.context_window == UNBOUNDED_CONTEXT_WINDOW == 2**31 - 1
    chat_engine = SimpleChatEngine.from_defaults(llm=llm)
    assert chat_engine._memory.token_limit == UNBOUNDED_CONTEXT_WINDOW - 256
    assert SirLLM(engine=llm.engine, context_window=2048).metadata.context_window == 2048


def test_constructor_errors(engine):
    with pytest.raises(ValueError, match=r"either engine= .* or model=, not both"):
        SirLLM(engine=engine, model="some/model")
    with pytest.raises(ValueError, match="cache_size must be at least start_size \\+ recent_size \\+ 16 = 21"):
        SirLLM(engine=engine, cache_size=10)
    with pytest.raises(ValueError, match="decay"):
        SirLLM(engine=engine, decay=1.5)


def test_chat_engine_40_turns_prefills_only_new_tokens_within_cache_size(engine):
    cache_size = 192
    llm = SirLLM(engine=engine, max_new_tokens=4, cache_size=cache_size)
    chat_engine = SimpleChatEngine.from_defaults(llm=llm, system_prompt=SYSTEM)
    stats = llm.session.stats
    conversation = [{"role": "system", "content": SYSTEM}]
    prefills = []
    for turn in range(40):
        question = f"Turn {turn}: name a number."
        before = engine.model.template.render(conversation, add_generation_prompt=False) if turn else ""
        ingested, prefilled, reused = llm.session.transcript.length, stats.prefilled_tokens, stats.reused_tokens
        conversation.append({"role": "user", "content": question})

        answer = chat_engine.chat(question).response

        prompt = engine.model.template.render(conversation, add_generation_prompt=True)
        new_tokens = len(engine.model.encode(prompt[len(before) :]))
        assert stats.turns == turn + 1
        assert stats.restarts == 0, f"turn {turn} restarted the session"
        assert stats.prefilled_tokens - prefilled == new_tokens, f"turn {turn}"
        assert stats.reused_tokens - reused == ingested, f"turn {turn}"
        assert stats.cache_len <= cache_size
        reply = llm.session.transcript.messages[-1]["content"]
        assert reply.strip() == answer  # the engine strips nothing here, but would not break the cache if it did
        conversation.append({"role": "assistant", "content": reply})
        prefills.append(new_tokens)
    assert max(prefills[1:]) <= 20  # each later turn: its user message and the generation prompt
    assert stats.evicted_tokens > 0  # the conversation outgrew the cache
    assert llm.session.transcript.length > 3 * cache_size
    print(f"prefill per turn after the first: {sorted(set(prefills[1:]))}; cache {stats.cache_len}/{cache_size}")


def test_stream_chat_pieces_add_up_and_last_carries_usage(llm):
    messages = [user("Say hello.")]
    expected = llm.chat(messages)
    llm.reset()
    chunks = list(llm.stream_chat(messages))
    assert len(chunks) == expected.raw["usage"]["completion_tokens"] == 6  # one piece per token here
    assert "".join(c.delta for c in chunks) == chunks[-1].message.content == expected.message.content
    assert [c.raw for c in chunks[:-1]] == [None] * 5
    assert chunks[-1].raw["usage"] == expected.raw["usage"]


def test_abandoned_stream_is_rolled_back(llm):
    messages = [user("Count to ten.")]
    stream = llm.stream_chat(messages)
    next(stream)
    stream.close()
    assert llm.stats.turns == 0
    reply = llm.chat(messages)  # the question is still cached: only the generation prompt is prefilled again
    assert reply.raw["sirllm"]["prefilled_tokens"] == len(llm.engine.model.encode("<|im_start|>assistant\n"))
    assert reply.raw["sirllm"]["restarts"] == 0


def test_usage_reaches_token_counting_handler(engine):
    counter = TokenCountingHandler()
    llm = SirLLM(engine=engine, max_new_tokens=5, callback_manager=CallbackManager([counter]))
    first = llm.chat([user("Hi!")])
    second = llm.chat([user("Hi!"), first.message, user("Bye!")])
    assert first.raw["usage"]["cached_tokens"] == 0
    assert second.raw["usage"]["cached_tokens"] == first.raw["sirllm"]["cache_len"]
    assert counter.prompt_llm_token_count == first.raw["usage"]["prompt_tokens"] + second.raw["usage"]["prompt_tokens"]
    assert counter.completion_llm_token_count == 10
    assert [e.prompt_token_count for e in counter.llm_token_counts] == [
        first.raw["usage"]["prompt_tokens"],
        second.raw["usage"]["prompt_tokens"],
    ]


def test_complete_leaves_the_chat_session_as_it_was(llm):
    first = llm.chat([user("My name is Ada.")])
    cached = llm.session.cache.token_ids.tolist()
    completion = llm.complete("Write a word.")
    assert completion.text and completion.raw["usage"]["completion_tokens"] <= 6
    assert llm.session.cache.token_ids.tolist() == cached  # untouched
    streamed = "".join(r.delta for r in llm.stream_complete("Write a word."))
    assert streamed == completion.text  # greedy: the same one-turn chat
    second = llm.chat([user("My name is Ada."), first.message, user("What is my name?")])
    assert second.raw["sirllm"]["reused_tokens"] == first.raw["sirllm"]["cache_len"]
    assert llm.stats.restarts == 0


@pytest.mark.asyncio
async def test_async_chat_and_stream_match_sync(llm):
    messages = [user("Name a colour.")]
    expected = llm.chat(messages).message.content
    llm.reset()
    assert (await llm.achat(messages)).message.content == expected
    llm.reset()
    chunks = [c async for c in await llm.astream_chat(messages)]
    assert "".join(c.delta for c in chunks) == chunks[-1].message.content == expected
    assert chunks[-1].raw["usage"]["completion_tokens"] == 6
    assert (await llm.acomplete("Name a colour.")).text == expected
    assert "".join([r.delta async for r in await llm.astream_complete("Name a colour.")]) == expected


@pytest.mark.asyncio
async def test_concurrent_async_calls_are_serialized_and_leave_the_loop_free(llm):
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(ticker())
    a, b = [user("Say yes.")], [user("Say no.")]

    async def streamed(messages):
        return [c async for c in await llm.astream_chat(messages)][-1]

    replies = await asyncio.gather(llm.achat(a), streamed(b), llm.achat(a))
    beat.cancel()
    assert ticks > 10  # the event loop ran while the model decoded
    assert llm.stats.turns == 3
    assert all(r.raw["usage"]["completion_tokens"] == 6 for r in replies)
    assert replies[0].message.content == replies[2].message.content


@pytest.mark.asyncio
async def test_abandoned_async_stream_is_rolled_back(llm):
    messages = [user("Count to ten.")]
    stream = await llm.astream_chat(messages)
    await anext(stream)
    await stream.aclose()
    reply = await llm.achat(messages)
    assert llm.stats.turns == 1
    assert reply.raw["sirllm"]["prefilled_tokens"] == len(llm.engine.model.encode("<|im_start|>assistant\n"))
    assert reply.raw["sirllm"]["restarts"] == 0


def test_bad_input_raises_clear_errors(llm):
    with pytest.raises(ValueError, match="messages is empty: SirLLM needs at least one ChatMessage"):
        llm.chat([])
    wizard = ChatMessage.model_construct(role="wizard", blocks=[TextBlock(text="hi")], additional_kwargs={})
    with pytest.raises(ValueError, match=r"messages\[1\]: unknown role 'wizard' \(SirLLM takes assistant, "):
        llm.chat([user("hi"), wizard])
    with pytest.raises(ValueError, match=r"messages\[0\] must be a ChatMessage, got dict"):
        llm.chat([{"role": "user", "content": "hi"}])
    image = ChatMessage(role="user", blocks=[ImageBlock(url="https://example.com/a.png")])
    with pytest.raises(ValueError, match=r"messages\[0\] \(user\) holds a 'image' block: SirLLM takes text"):
        llm.chat([image])
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) max_tokens"):
        llm.chat([user("hi")], max_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        llm.chat([user("hi")], max_new_tokens=0)
    with pytest.raises(ValueError, match="messages is empty"):
        llm.stream_chat([])  # raised on the call, not on the first piece
    with pytest.raises(ValueError, match="prompt must be a string, got list"):
        llm.complete(["hi"])
    assert llm.stats.turns == 0


def test_conversion_reads_text_and_tool_calls():
    reply = ChatMessage(role="assistant", content="Hello!")
    edited = ChatMessage(role="assistant", content="Bye.")
    calls = ChatMessage(
        role="assistant",
        content="",
        additional_kwargs={"tool_calls": [{"id": "c1", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
    )
    block = ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="c2", tool_name="add", tool_kwargs={})])
    result = ChatMessage(role="tool", content="2", additional_kwargs={"tool_call_id": "c1", "name": "add"})
    assert to_session_messages(
        [ChatMessage(role="developer", content="Be brief."), reply, edited, calls, block, result]
    ) == [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "assistant", "content": "Bye."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}],
        },
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c2", "type": "function", "function": {"name": "add", "arguments": {}}}],
        },
        {"role": "tool", "content": "2", "tool_call_id": "c1", "name": "add"},
    ]


def test_repetition_penalties_as_fields_and_call_arguments(engine):
    messages = [{"role": "user", "content": "Name three colours."}]
    options = {"frequency_penalty": 1.5, "presence_penalty": 1.0}
    penalised = engine.session(cache_size=512).chat(messages, max_new_tokens=16, **options)
    plain = engine.session(cache_size=512).chat(messages, max_new_tokens=16)
    assert penalised.content != plain.content
    as_fields = SirLLM(engine=engine, max_new_tokens=16, cache_size=512, **options)
    assert as_fields.chat([user("Name three colours.")]).message.content == penalised.content
    llm = SirLLM(engine=engine, max_new_tokens=16, cache_size=512)
    assert llm.chat([user("Name three colours.")], **options).message.content == penalised.content
    with pytest.raises(ValueError, match="repeat_penalty must be > 0"):
        llm.chat([user("hi")], repeat_penalty=0.0)
