"""Closing a constrained JSON value within max_new_tokens: every prefix of a valid reply closes into a value the
grammar accepts with every required key; the decode loop writes the closing in time, or leaves a reply that cannot
be closed to finish_reason "length"."""

from __future__ import annotations

import json

import llguidance
import pytest

from sirllm_agents.closing import JsonCloser
from sirllm_agents.constrained import JSON_FORMAT, _call_schema, _closed, json_schema_constraint
from sirllm_agents.tools import TOOL_CALL_END, TOOL_CALL_START

STRING = {"type": "string"}
JOKE = {"type": "object", "properties": {"setup": STRING, "punchline": STRING}, "required": ["setup", "punchline"]}
NESTED = {
    "type": "object",
    "properties": {
        "name": STRING,
        "age": {"type": "integer", "minimum": 18},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": STRING, "minItems": 2},
        "address": {"$ref": "#/$defs/Address"},
        "mood": {"enum": ["happy", "sad"]},
        "nickname": {"anyOf": [STRING, {"type": "null"}]},
    },
    "required": ["name", "age", "tags", "address", "mood"],
    "$defs": {
        "Address": {"type": "object", "properties": {"city": STRING, "zip": STRING}, "required": ["city", "zip"]}
    },
}
EVENTS = {
    "type": "object",
    "properties": {
        "attendees": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": STRING, "role": {"enum": ["host", "guest"]}},
                "required": ["name", "role"],
            },
            "minItems": 1,
        },
        "notes": STRING,
    },
    "required": ["attendees"],
}
VALUES = [
    (JOKE, {"setup": 'Why did the "cat" sit\\n on 東京?', "punchline": "To keep an eye on the mouse 🙂."}),
    (
        NESTED,
        {
            "name": "Ada",
            "age": 36,
            "score": -12.5e3,
            "active": True,
            "tags": ["math", "code"],
            "address": {"city": "London", "zip": "NW1"},
            "mood": "happy",
            "nickname": None,
        },
    ),
    (EVENTS, {"attendees": [{"name": "Bo", "role": "host"}, {"name": "Cy", "role": "guest"}], "notes": "at 5"}),
]


def compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def has_required(value, schema, root) -> bool:
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        return all(k in value for k in schema.get("required", [])) and all(
            has_required(v, properties.get(k, {}), root) for k, v in value.items()
        )
    if isinstance(value, list):
        return all(has_required(v, schema.get("items", {}), root) for v in value)
    return True


def grammar_accepts(matcher: llguidance.LLMatcher, tokenizer, text: str) -> bool:
    matcher.reset()
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.validate_tokens(tokens) == len(tokens) and matcher.consume_tokens(tokens) and matcher.is_accepting()


@pytest.mark.parametrize(("schema", "value"), VALUES, ids=["joke", "nested", "events"])
def test_every_prefix_of_a_valid_reply_closes_into_a_whole_value_the_grammar_accepts(
    tiny_torch_engine, tokenizer, schema, value
):
    closed = _closed(schema)
    closer = JsonCloser(closed)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(closed, defaults=JSON_FORMAT)
    matcher = llguidance.LLMatcher(tiny_torch_engine.model.grammar_tokenizer, grammar)
    text = compact(value)
    assert grammar_accepts(matcher, tokenizer, text)  # the layout the grammar writes
    for cut in range(len(text) + 1):
        prefix = text[:cut]
        rest = closer.close(prefix)
        assert rest is not None, f"no closing for {prefix!r}"
        whole = json.loads(prefix + rest)
        assert has_required(whole, schema, schema), prefix + rest
        assert grammar_accepts(matcher, tokenizer, prefix + rest), prefix + rest
    assert closer.close(text) == ""


def test_the_closing_is_the_smallest_value_of_each_missing_key():
    closer = JsonCloser(_closed(NESTED))
    assert closer.close('{"name": "Ad') == (
        '", "age": 18, "tags": ["", ""], "address": {"city": "", "zip": ""}, "mood": "sad"}'
    )
    # Keys come in the declared order: after "score", "a" can only begin "active" (optional), never "address".
    assert closer.close('{"name": "Ada", "age": 40, "score": 1.5, "a') == (
        'ctive": false, "tags": ["", ""], "address": {"city": "", "zip": ""}, "mood": "sad"}'
    )
    assert closer.close('{"name": "Ada", "mo') is None  # "age" is required before it
    assert (
        closer.close('{"name": "Ada", "age": 4')
        == '0, "tags": ["", ""], "address": {"city": "", "zip": ""}, "mood": "sad"}'
    )
    assert (
        closer.close('{"name": "a\\')
        == '\\", "age": 18, "tags": ["", ""], "address": {"city": "", "zip": ""}, "mood": "sad"}'
    )


def test_a_tool_call_closes_with_its_markup_and_the_branch_its_name_chose():
    volume = {
        "name": "set_volume",
        "parameters": {"type": "object", "properties": {"level": {"type": "integer"}}, "required": ["level"]},
    }
    mode = {
        "name": "set_mode",
        "parameters": {"type": "object", "properties": {"mode": {"enum": ["shuffle", "repeat"]}}, "required": ["mode"]},
    }
    calls = {"anyOf": [_call_schema(volume), _call_schema(mode)], "x-guidance": JSON_FORMAT}
    closer = JsonCloser(calls, prefix=TOOL_CALL_START + "\n", suffix="\n" + TOOL_CALL_END)
    assert closer.close("<tool") == '_call>\n{"name": "set_volume", "arguments": {"level": 0}}\n</tool_call>'
    assert closer.close('<tool_call>\n{"name": "set_v') == 'olume", "arguments": {"level": 0}}\n</tool_call>'
    assert closer.close('<tool_call>\n{"name": "set_mode", "arguments": {"mode": "sh') == 'uffle"}}\n</tool_call>'
    assert closer.close('<tool_call>\n{"name": "set_mode", "arguments": {"mode": "shuffle"}}\n</to') == "ol_call>"
    assert closer.close("Sure!") is None


def test_no_closing_is_made_up_where_the_schema_cannot_be_closed_here():
    closer = JsonCloser(
        _closed(
            {"type": "object", "properties": {"day": {"type": "string", "pattern": "^[0-9]+$"}}, "required": ["day"]}
        )
    )
    assert closer.close('{"day": "1') is None
    assert closer.close("{") is None
    assert JsonCloser(_closed(JOKE)).close('{"colour": ') is None  # not a key of the schema


# -- in the decode loop, on the embedded model -------------------------------------------------------------------

TELL = [{"role": "user", "content": "Tell me a joke about cats"}]


@pytest.mark.parametrize("budget", [12, 20, 28])  # under the ~35 tokens of the greedy joke on either backend
def test_a_reply_about_to_run_out_is_closed_as_a_whole_value_within_the_budget(embedded_engine, budget):
    reply = embedded_engine.session(cache_size=1024).chat(
        TELL, response_format={"type": "json_schema", "schema": JOKE}, max_new_tokens=budget
    )
    joke = json.loads(reply.text)
    assert set(joke) == {"setup", "punchline"} and all(isinstance(v, str) for v in joke.values())
    assert reply.finish_reason == "stop" and reply.closed_at_limit
    assert len(reply.token_ids) <= budget


def test_a_closing_that_cannot_fit_leaves_the_reply_cut_off(embedded_engine):
    tools = [{"name": "tell", "parameters": {"type": "object", "properties": {"joke": STRING}, "required": ["joke"]}}]
    reply = embedded_engine.session(cache_size=1024).chat(TELL, tools=tools, tool_choice="required", max_new_tokens=6)
    assert reply.finish_reason == "length" and not reply.closed_at_limit and reply.tool_calls == []
    assert len(reply.token_ids) == 6


def test_a_reply_that_ends_by_itself_is_not_marked_closed(tiny_engine):
    constraint = json_schema_constraint(
        tiny_engine.model, {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    )
    reply = tiny_engine.session().chat(TELL, constraint=constraint, max_new_tokens=64)
    assert json.loads(reply.text) in ({"ok": True}, {"ok": False})
    assert reply.finish_reason == "stop" and not reply.closed_at_limit
