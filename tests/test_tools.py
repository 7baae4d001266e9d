"""Tool definitions in the prompt and tool calls parsed out of replies (sirllm_agents.tools)."""

from __future__ import annotations

import json

import pytest

from sirllm_agents import Engine
from sirllm_agents.tools import (
    ToolCall,
    format_tool_call,
    normalize_tools,
    parse_tool_calls,
    split_tool_calls,
    tools_prompt,
)

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
NOW = {"name": "now", "description": "The current time."}  # bare form, no parameters
TOOLS = [ADD, NOW]

# Renders the tool definitions, like the templates of Qwen2.5 or Llama 3.1 do.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}</call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tools_engine(make_tiny_llama, tokenizer) -> Engine:
    return Engine(make_tiny_llama(), tokenizer=tokenizer, chat_template=TOOLS_TEMPLATE)


def test_normalize_tools_accepts_openai_and_bare_forms():
    assert normalize_tools(TOOLS) == [
        ADD,
        {
            "type": "function",
            "function": {
                "name": "now",
                "description": "The current time.",
                "parameters": {"type": "object", "properties": {}},
            },
        },
    ]


@pytest.mark.parametrize(
    ("tools", "error"),
    [
        ([{"description": "no name"}], r"tools\[0\] must be a dict with a 'name'"),
        (["add"], r"tools\[0\] must be a dict with a 'name'"),
        ([ADD, ADD], r"tool names must be unique, got \['add', 'add'\]"),
    ],
)
def test_normalize_tools_rejects_bad_definitions(tools, error):
    with pytest.raises(ValueError, match=error):
        normalize_tools(tools)


def test_tools_prompt_lists_each_tool_and_the_call_format():
    lines = tools_prompt(TOOLS).split("\n")
    assert lines[1] == json.dumps(ADD["function"])
    assert json.loads(lines[2]) == {
        "name": "now",
        "description": "The current time.",
        "parameters": {"type": "object", "properties": {}},
    }
    assert lines[-5:] == [
        "To call a tool, reply with the call and nothing else, in this form:",
        "<tool_call>",
        '{"name": "<tool name>", "arguments": <the arguments as a JSON object>}',
        "</tool_call>",
        "When you do not need a tool, reply in plain text.",
    ]


def test_format_tool_call_is_compact_json_between_tags():
    assert (
        format_tool_call("add", {"a": 1, "b": 2})
        == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    )
    assert (
        format_tool_call("greet", '{"who": "你好"}')
        == '<tool_call>\n{"name": "greet", "arguments": {"who": "你好"}}\n</tool_call>'
    )
    assert format_tool_call("now", "") == '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'


def test_template_renders_tools(tiny_engine, tools_engine):
    assert tiny_engine.model.template.renders_tools is False  # SmolLM2's template ignores tools
    assert tools_engine.model.template.renders_tools is True


def test_prepare_puts_tools_in_a_new_system_message_when_the_template_ignores_them(tiny_engine):
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    prepared, tools = tiny_engine.model.template.prepare(messages, TOOLS)
    assert tools is None
    assert prepared == [{"role": "system", "content": tools_prompt(TOOLS)}, messages[0]]
    assert messages == [{"role": "user", "content": "What is 1 + 2?"}]  # the input is not modified


def test_prepare_appends_tools_to_an_existing_system_message_and_writes_calls_into_content(tiny_engine):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "3", "tool_call_id": "call_1", "name": "add"},
        {"role": "assistant", "content": "Adding.", "tool_calls": [call, call]},
    ]
    prepared, tools = tiny_engine.model.template.prepare(messages, TOOLS)
    assert tools is None
    assert prepared[0] == {"role": "system", "content": "Be brief.\n\n" + tools_prompt(TOOLS)}
    assert prepared[2] == {"role": "assistant", "content": format_tool_call("add", {"a": 1, "b": 2})}
    assert prepared[3] == messages[3]
    assert prepared[4]["content"] == "Adding.\n" + "\n".join([format_tool_call("add", {"a": 1, "b": 2})] * 2)
    # Deterministic: the same conversation prepares to the same messages, so the session can extend it.
    assert tiny_engine.model.template.prepare(messages, TOOLS) == (prepared, None)


def test_prepare_without_tools_still_writes_earlier_calls_into_content(tiny_engine):
    call = {"function": {"name": "now", "arguments": "{}"}}
    prepared, tools = tiny_engine.model.template.prepare(
        [{"role": "assistant", "content": None, "tool_calls": [call]}], None
    )
    assert (prepared, tools) == ([{"role": "assistant", "content": format_tool_call("now", {})}], None)


def test_prepare_hands_tools_to_a_template_that_renders_them(tools_engine):
    call = {"id": "c", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    messages = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    prepared, tools = tools_engine.model.template.prepare(messages, [NOW])
    assert prepared == messages
    assert tools == normalize_tools([NOW])
    rendered = tools_engine.model.template.render(prepared, add_generation_prompt=True, tools=tools)
    assert '"name": "now"' in rendered and "<call>add</call>" in rendered


def test_parse_a_tagged_call():
    (call,) = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', TOOLS)
    assert (call.name, call.arguments) == ("add", {"a": 1, "b": 2})
    assert call.id.startswith("call_") and len(call.id) == 29


def test_parse_several_calls_get_distinct_ids():
    text = format_tool_call("add", {"a": 1, "b": 2}) + "\n" + format_tool_call("now", {})
    calls = parse_tool_calls(text, TOOLS)
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2}), ("now", {})]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "add", "arguments": {"a": 1, "b": 2}}',  # a bare JSON call
        '```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```',  # in a code fence
        '[{"name": "add", "arguments": {"a": 1, "b": 2}}]',  # a list of calls
        '{"name": "add", "parameters": {"a": 1, "b": 2}}',  # "parameters" for "arguments"
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>',  # arguments as a string
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}',  # closing tag cut off
    ],
)
def test_parse_accepted_call_spellings(text):
    assert [(c.name, c.arguments) for c in parse_tool_calls(text, TOOLS)] == [("add", {"a": 1, "b": 2})]


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 3.",
        '<tool_call>{"name": "subtract", "arguments": {}}</tool_call>',  # unknown tool
        '<tool_call>{"name": "add", "arguments": {"a": 1, </tool_call>',  # broken JSON
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # arguments not an object
        '<tool_call>"add"</tool_call>',
        "{}",
        "",
        format_tool_call("add", {"a": 1, "b": 2}) + '<tool_call>{"name": "nope"}</tool_call>',  # one bad call
    ],
)
def test_parse_anything_else_is_plain_text(text):
    assert parse_tool_calls(text, TOOLS) == []
    assert split_tool_calls(text, TOOLS) == (text, [])


def test_parse_never_raises_on_malformed_tools():
    assert parse_tool_calls(format_tool_call("add", {}), [{"oops": 1}]) == []
    assert parse_tool_calls(format_tool_call("add", {}), None) == []


def test_split_returns_the_text_around_the_calls():
    text = "Let me add them.\n" + format_tool_call("add", {"a": 1, "b": 2}) + "\n"
    content, calls = split_tool_calls(text, TOOLS)
    assert content == "Let me add them."
    assert [c.name for c in calls] == ["add"]
    assert isinstance(calls[0], ToolCall)
