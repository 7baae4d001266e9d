"""Grammar-constrained decoding (sirllm_agents.constrained) on a tiny random Llama: whatever the weights, what it
decodes under a constraint is valid."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from sirllm_agents.constrained import (
    GrammarConstraint,
    json_object_constraint,
    json_schema_constraint,
    tool_call_constraint,
)
from sirllm_agents.tools import format_tool_call, parse_tool_calls

SET_VOLUME = {
    "name": "set_volume",
    "description": "Set the speaker volume.",
    "parameters": {
        "type": "object",
        "properties": {
            "level": {"type": "integer", "minimum": 0, "maximum": 10},
            "mute": {"type": "boolean"},
        },
        "required": ["level", "mute"],
    },
}
SET_MODE = {
    "name": "set_mode",
    "description": "Set the playback mode.",
    "parameters": {"type": "object", "properties": {"mode": {"enum": ["shuffle", "repeat"]}}, "required": ["mode"]},
}
TOOLS = [SET_VOLUME, SET_MODE]
ASK = [{"role": "user", "content": "Turn it up to 7."}]


def decode(engine, messages, constraint, max_new_tokens=48):
    # tool_choice="none": the tools are in the prompt, but the reply comes back as decoded, calls not read out.
    return engine.session().chat(
        messages, tools=TOOLS, tool_choice="none", constraint=constraint, max_new_tokens=max_new_tokens
    )


def allowed_ids(constraint: GrammarConstraint, vocab: int) -> set[int]:
    return set(torch.isfinite(constraint.mask(torch.zeros(vocab))).nonzero().flatten().tolist())


@pytest.mark.parametrize("choice", ["any", "required"])
def test_a_required_call_is_always_a_valid_call(tiny_engine, choice):
    reply = decode(tiny_engine, ASK, tool_call_constraint(tiny_engine.model, TOOLS, choice))
    (call,) = parse_tool_calls(reply.text, TOOLS)
    assert reply.finish_reason == "stop"
    assert call.name in ("set_volume", "set_mode")
    if call.name == "set_volume":
        assert list(call.arguments) == ["level", "mute"]
        assert 0 <= call.arguments["level"] <= 10 and isinstance(call.arguments["mute"], bool)
    else:
        assert call.arguments["mode"] in ("shuffle", "repeat")
    # Compact JSON with json.dumps separators: re-rendering the call gives back the reply text.
    assert reply.text == format_tool_call(call.name, call.arguments)


def test_a_named_tool_choice_calls_that_tool(tiny_engine):
    reply = decode(tiny_engine, ASK, tool_call_constraint(tiny_engine.model, TOOLS, "set_mode"))
    (call,) = parse_tool_calls(reply.text, TOOLS)
    assert call.name == "set_mode" and call.arguments["mode"] in ("shuffle", "repeat")


def test_an_unknown_tool_choice_is_an_error(tiny_engine):
    with pytest.raises(ValueError, match=r"tool_choice 'play' is not one of the tools \('set_volume', 'set_mode'\)"):
        tool_call_constraint(tiny_engine.model, TOOLS, "play")


def test_a_tool_without_parameters_gets_empty_arguments(tiny_engine):
    reply = decode(tiny_engine, ASK, tool_call_constraint(tiny_engine.model, [{"name": "stop"}], "any"))
    assert reply.text == '<tool_call>\n{"name": "stop", "arguments": {}}\n</tool_call>'


def test_a_tool_whose_schema_cannot_be_enforced_still_gets_a_json_object(tiny_engine, caplog):
    remote = {"name": "fetch", "parameters": {"type": "object", "properties": {"x": {"$ref": "http://example.com/x"}}}}
    with caplog.at_level(logging.WARNING, logger="sirllm_agents.constrained"):
        constraint = tool_call_constraint(tiny_engine.model, [remote], "any")
    assert "tool 'fetch': its parameter schema cannot be enforced" in caplog.text
    reply = decode(tiny_engine, ASK, constraint, max_new_tokens=200)
    if reply.finish_reason == "stop":  # a random model may write a long object; when it closes, it is a call
        assert [c.name for c in parse_tool_calls(reply.text, [remote])] == ["fetch"]


def test_json_schema_output_follows_the_schema(tiny_engine):
    schema = {
        "type": "object",
        "properties": {"size": {"enum": ["S", "M", "L"]}, "count": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["size", "count"],
    }
    reply = decode(tiny_engine, ASK, json_schema_constraint(tiny_engine.model, schema))
    value = json.loads(reply.text)
    assert list(value) == ["size", "count"]  # declared order, no extra keys
    assert value["size"] in ("S", "M", "L") and 1 <= value["count"] <= 9
    assert reply.finish_reason == "stop"


def test_an_unenforceable_json_schema_is_an_error(tiny_engine):
    with pytest.raises(ValueError, match=r"this JSON schema cannot be enforced: Resource 'http://example\.com/x'"):
        json_schema_constraint(tiny_engine.model, {"$ref": "http://example.com/x"})


def test_objects_are_closed_unless_the_schema_says_otherwise(tiny_engine, tokenizer):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for closed, open_ in ((schema, {**schema, "additionalProperties": True}),):
        constraints = [
            json_schema_constraint(tiny_engine.model, closed),
            json_schema_constraint(tiny_engine.model, open_),
        ]
        for constraint in constraints:
            for token in tokenizer('{"a": 1', add_special_tokens=False)["input_ids"]:
                constraint.accept(token)
        comma = tokenizer(",", add_special_tokens=False)["input_ids"][0]
        assert comma not in allowed_ids(constraints[0], len(tokenizer))
        assert comma in allowed_ids(constraints[1], len(tokenizer))


def test_json_object_mask_accept_and_finish(tiny_engine, tokenizer):
    constraint = json_object_constraint(tiny_engine.model)
    vocab = len(tokenizer)
    logits = torch.zeros(vocab)
    masked = constraint.mask(logits)
    assert torch.equal(logits, torch.zeros(vocab))  # the input row is left as it was
    brace = tokenizer("{", add_special_tokens=False)["input_ids"][0]
    hello = tokenizer("Hello", add_special_tokens=False)["input_ids"][0]
    assert torch.isfinite(masked[brace]) and masked[hello] == float("-inf")
    for token in tokenizer('{"a": [1, "x"]}', add_special_tokens=False)["input_ids"]:
        assert not constraint.is_finished()
        constraint.accept(token)
    assert constraint.is_finished()
    assert allowed_ids(constraint, vocab) == set(tiny_engine.model.stop_token_ids)


def test_json_object_decoding_is_an_object_or_cut_off_by_the_budget(tiny_engine):
    reply = decode(tiny_engine, ASK, json_object_constraint(tiny_engine.model), max_new_tokens=40)
    assert reply.text.startswith("{")
    if reply.finish_reason == "stop":
        assert isinstance(json.loads(reply.text), dict)
    else:
        assert reply.stats.generated_tokens == 40
