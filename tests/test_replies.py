"""The core's request path pieces: tool choice in one form, response formats, and the text a stream may show while a
reply may still turn out to be a tool call."""

from __future__ import annotations

import pytest

from sirllm_agents.replies import ShownText, normalize_tool_choice, response_schema

TOOLS = [{"type": "function", "function": {"name": "set_level", "parameters": {"type": "object"}}}]


def test_shown_text_while_a_reply_may_still_be_a_tool_call():
    def feed(mode, pieces):
        shown = ShownText(mode)
        return [shown.push(p) for p in pieces], shown.text

    assert feed("pass", [" Hi", " there "]) == ([" Hi", " there "], " Hi there ")
    assert feed("hold", ["Hi", " there"]) == (["", ""], "")
    # Trailing whitespace and a possible start of "<tool_call>" wait; the call itself never shows.
    assert feed("auto", ["Sure ", "<tool", "_call>\n{", '"name"']) == (["Sure", "", "", ""], "Sure")
    assert feed("auto", ["Sure ", "<b>"]) == (["Sure", " <b>"], "Sure <b>")
    # A reply that opens like a JSON call, or with whitespace, is held to the end.
    assert feed("auto", ['{"name"', ": 1}"]) == (["", ""], "")
    assert feed("auto", ["\n", "Hi"]) == (["", ""], "")


@pytest.mark.parametrize(
    ("choice", "normalized"),
    [
        (None, "auto"),
        ("auto", "auto"),
        ("none", "none"),
        (False, "none"),
        (True, "required"),
        ("any", "required"),
        ("required", "required"),
        ("set_level", "set_level"),
        ({"type": "function", "function": {"name": "set_level"}}, "set_level"),
        ({"type": "required"}, "required"),
    ],
)
def test_tool_choice_has_one_form(choice, normalized):
    assert normalize_tool_choice(choice, TOOLS) == normalized


def test_bad_tool_choices_are_clear_errors():
    with pytest.raises(ValueError, match=r"one of the tool names \['set_level'\], got 'get_weather'"):
        normalize_tool_choice("get_weather", TOOLS)
    with pytest.raises(ValueError, match="tool_choice='required' needs tools"):
        normalize_tool_choice("required", None)


def test_response_formats():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert response_schema({"type": "json_schema", "schema": schema}) == schema
    assert response_schema({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == schema
    assert response_schema({"type": "json_object"}) is None
    with pytest.raises(ValueError, match="needs a schema"):
        response_schema({"type": "json_schema"})
    with pytest.raises(ValueError, match="must be of type 'json_schema' or 'json_object'"):
        response_schema({"type": "text"})
