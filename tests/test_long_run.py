"""A session that runs for ever: each call renders and checks only what it adds, and the records that grow with the
conversation stay bounded unless asked for."""

from __future__ import annotations

import pytest
import torch

from sirllm_agents import Engine, SessionConfig, config, transcript
from sirllm_agents.history import TokenHistory
from sirllm_agents.model import Model
from sirllm_agents.transcript import ChatTemplate

NUMBERING_TEMPLATE = (  # writes each message's index: what follows depends on how many came before
    "{% for m in messages %}<|im_start|>{{ loop.index }} {{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversation(n: int) -> list[dict]:
    messages = [{"role": "system", "content": "You log sensor readings."}]
    for i in range(n):
        messages.append({"role": "user", "content": f"Sensor {i} reads {i * 7 % 100}."})
        messages.append({"role": "assistant", "content": f"Logged {i}."})
    return messages


def calls_tool(n: int) -> dict:
    function = {"name": "lookup", "arguments": {"n": n}}
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": f"c{n}", "type": "function", "function": function}],
    }


@pytest.mark.parametrize("tools", [None, [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]])
def test_what_new_messages_add_renders_as_in_the_whole_conversation(tokenizer, tools):
    template = ChatTemplate(tokenizer)
    assert template.concatenates
    messages = conversation(6)
    messages[5:5] = [calls_tool(1), {"role": "tool", "content": "r1", "tool_call_id": "c1"}]
    messages[9:9] = [calls_tool(2), {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}]
    for start in range(len(messages)):
        for end in range(start + 1, len(messages) + 1):
            for generation in (False, True):
                whole = template.render(messages[:end], generation, tools)
                before = template.render(messages[:start], False, tools) if start else ""
                added = template.continuation(messages, start, generation, tools, end=end)
                assert before + added == whole, (start, end, generation)


def test_a_template_that_numbers_messages_is_rendered_whole(tiny_engine):
    template = ChatTemplate(tiny_engine.model.tokenizer, NUMBERING_TEMPLATE)
    assert not template.concatenates
    # The same template without the numbers passes the probe: the number is what fails it.
    assert ChatTemplate(tiny_engine.model.tokenizer, NUMBERING_TEMPLATE.replace("{{ loop.index }} ", "")).concatenates
    messages = conversation(4)
    assert template.context(messages, 7) == messages[:7]
    base = tiny_engine.model
    model = Model(base.backend, base.tokenizer, "numbered", NUMBERING_TEMPLATE)
    engine = Engine(model)
    session = engine.session(cache_size=2048)
    for end in range(3, len(messages) + 1, 2):
        session.ingest(messages[:end])
        assert session.cache.token_ids.tolist() == model.encode(model.template.render(messages[:end], False))
    assert session.stats.restarts == 0


def test_a_call_checks_only_the_messages_it_adds(tiny_engine, monkeypatch):
    session = tiny_engine.session(cache_size=128)
    messages = conversation(40)
    session.ingest(messages)
    normalized = []
    checked = transcript.normalize_message
    monkeypatch.setattr(transcript, "normalize_message", lambda i, m: normalized.append(i) or checked(i, m))
    reply = session.chat(messages + [{"role": "user", "content": "Next?"}], max_new_tokens=3)
    assert normalized == [len(messages)] and reply.stats.restarts == 0
    # Sent back as the session gave it, the reply is recognised without a check either.
    normalized.clear()
    messages += [{"role": "user", "content": "Next?"}, reply.as_message(), {"role": "user", "content": "And?"}]
    session.ingest(messages)
    assert normalized == [len(messages) - 1] and session.stats.restarts == 0


def test_an_earlier_message_edited_in_place_restarts_the_session(tiny_engine):
    session = tiny_engine.session(cache_size=128)
    messages = conversation(5)
    session.ingest(messages)
    messages[3]["content"] = "Sensor 1 reads 99."  # the caller's own dict, changed after it was sent
    session.ingest(messages + [{"role": "user", "content": "Again."}])
    assert session.stats.restarts == 1
    assert session.transcript.messages[3]["content"] == "Sensor 1 reads 99."


def test_the_history_keeps_the_newest_window():
    history = TokenHistory(window=16)
    for position in range(0, 100, 5):
        history.extend(torch.arange(position, position + 5), torch.arange(position, position + 5), turn=position)
        assert history.end == position + 5 and len(history.ids) <= 2 * 16 + 5
        assert history.ids.tolist() == list(range(history.start, history.end))
    assert history.start > 0 and history.end - history.start >= 16
    history.truncate(97)
    assert history.end == 97 and history.ids.tolist() == list(range(history.start, 97))
    history.truncate(history.start - 3)
    assert history.end == history.start and history.ids.numel() == 0


def test_a_long_session_keeps_bounded_records_unless_asked(tiny_engine, monkeypatch, tmp_path):
    monkeypatch.setattr(config, "HISTORY_TOKENS", 64)
    monkeypatch.setattr(config, "TURN_LOG_CALLS", 5)
    messages = conversation(30)
    bounded, kept = tiny_engine.session(cache_size=96), tiny_engine.session(cache_size=96, keep_history=True)
    for end in range(3, len(messages) + 1, 2):
        bounded.ingest(messages[:end])
        kept.ingest(messages[:end])
    length = bounded.transcript.length
    assert kept.cache.history.start == 0 and len(kept.cache.history_ids) == length and len(kept.turn_log) == 30
    assert 64 <= len(bounded.cache.history_ids) <= 128 and bounded.cache.history.end == length
    assert len(bounded.turn_log) == 5
    assert torch.equal(bounded.cache.history_ids, kept.cache.history_ids[bounded.cache.history.start :])
    # The memory view covers the window, and still every cached token, the attention sinks older than it included.
    memory = bounded.memory()
    assert [t.position for t in memory.tokens] == bounded.cache.positions.tolist()
    older = [p for p in bounded.cache.positions.tolist() if p < bounded.cache.history.start]
    assert older and [t.position for t in memory.conversation[: len(older)]] == older
    assert memory.conversation[len(older)].position == bounded.cache.history.start
    assert sum(memory.evicted_per_turn.values()) == len(memory.conversation) - len(bounded)
    assert [t.token_id for t in memory.tokens] == bounded.cache.token_ids.tolist()
    # A saved bounded session loads whole and continues as the original.
    path = tmp_path / "s.safetensors"
    bounded.save(path)
    loaded = tiny_engine.load_session(path)
    assert loaded.cache.history.start == bounded.cache.history.start
    assert torch.equal(loaded.cache.history_ids, bounded.cache.history_ids)
    more = messages + [{"role": "user", "content": "Done?"}]
    assert loaded.chat(more, max_new_tokens=4).token_ids == bounded.chat(more, max_new_tokens=4).token_ids


def test_keep_history_must_be_a_bool():
    with pytest.raises(ValueError, match="keep_history must be True or False"):
        SessionConfig(keep_history="yes")


def test_routing_by_prefix_checks_no_held_message(tiny_engine, monkeypatch):
    messages = conversation(30)
    tiny_engine.chat(messages[:-1], "long-held", max_new_tokens=2)
    held = tiny_engine.route([], "long-held")
    resent = held.transcript.messages + [{"role": "user", "content": "Next?"}]
    normalized = []
    checked = transcript.normalize_message
    monkeypatch.setattr(transcript, "normalize_message", lambda i, m: normalized.append(i) or checked(i, m))
    assert tiny_engine.route([dict(m) for m in resent]) is held
    assert normalized == []
    tiny_engine.drop_session("long-held")
