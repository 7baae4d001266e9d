"""A 30-step create_agent loop with a python tool on the embedded model: every step prefills only its new messages,
and the KV cache stays within cache_size while the conversation outgrows it."""

from __future__ import annotations

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_sirllm import ChatSirLLM

pytestmark = pytest.mark.slow

STEPS = 30
CACHE_SIZE = 384


@tool
def next_number(n: int) -> int:
    """Return the number after n."""
    return n + 1


def test_thirty_step_agent_prefills_only_new_messages(embedded_engine):
    llm = ChatSirLLM(engine=embedded_engine, max_tokens=40, cache_size=CACHE_SIZE)
    session = llm.session
    model = session.model
    expected_new: list[int] = []

    @wrap_model_call
    def count_then_answer(request, handler):
        """Require a tool call for the first STEPS model calls, then let the model answer."""
        ingested = session.transcript.text
        response = handler(request.override(tool_choice="any" if len(expected_new) < STEPS else "none"))
        # What the call had to prefill: its prompt's rendering past what the session held before it.
        transcript = session.transcript
        prompt = model.template.render(transcript.messages[:-1], add_generation_prompt=True, tools=transcript.tools)
        assert prompt.startswith(ingested)
        expected_new.append(len(model.encode(prompt[len(ingested) :])))
        return response

    agent = create_agent(
        llm,
        tools=[next_number],
        system_prompt="Count upwards with next_number, starting at 1.",
        middleware=[count_then_answer],
    )
    state = agent.invoke({"messages": [HumanMessage("Count.")]}, {"recursion_limit": 4 * STEPS})

    replies = [m for m in state["messages"] if isinstance(m, AIMessage)]
    assert len(replies) == STEPS + 1
    assert all(len(r.tool_calls) == 1 and r.tool_calls[0]["name"] == "next_number" for r in replies[:STEPS])
    assert replies[-1].tool_calls == []
    for step, (reply, new) in enumerate(zip(replies, expected_new, strict=True)):
        usage = reply.usage_metadata
        assert usage["input_tokens"] - usage["input_token_details"]["cache_read"] == new, f"step {step}"
        assert reply.response_metadata["cache_len"] <= CACHE_SIZE, f"step {step}"
        assert reply.response_metadata["restarts"] == 0, f"step {step}"
    # The conversation outgrew the cache: SirLLM evicted, yet no step restarted or re-read old messages.
    assert session.stats.evicted_tokens > 0
    assert session.transcript.length > CACHE_SIZE
    assert max(expected_new[1:]) < 40  # each later step: one tool result and the generation prompt
