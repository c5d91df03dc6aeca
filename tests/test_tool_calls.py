"""The tool-call glue of the server without a server: plans from tools and tool_choice, the parsers that
turn output text into OpenAI tool calls (streamed or not), and the two ways history with tools renders."""

from __future__ import annotations

import copy

import pytest

from flashdecode.entrypoints.server.errors import APIError
from flashdecode.entrypoints.server.handlers import OpenAIServing
from flashdecode.entrypoints.server.protocol import ChatMessage, NamedToolChoice, Tool
from flashdecode.entrypoints.server.tool_calls import (
    AutoToolCalls,
    ForcedToolCalls,
    inline_tools,
    parse_tool_calls,
    plan_tools,
    tool_calls_of,
)

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    Tool.model_validate({"type": "function", "function": {"name": "weather", "parameters": PARAMS}}),
    Tool.model_validate({"type": "function", "function": {"name": "clock"}}),
]
NAMES = {"weather", "clock"}


def _run(parser, text: str, step: int) -> tuple[str, list]:
    """``text`` fed ``step`` characters at a time, then closed; (content, whole calls)."""
    content, deltas = "", []
    for i in range(0, len(text), step):
        c, d = parser.feed(text[i : i + step])
        content, deltas = content + c, deltas + d
    c, d = parser.close()
    return content + c, [(t.function.name, t.function.arguments) for t in tool_calls_of(deltas + d)]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_forced_output_parses_the_same_however_it_streams(step: int) -> None:
    arguments = '{"city":"Pa\\"ris {x}","tags":[1,{"a":[]}]}'  # brackets inside strings do not count
    single = '{"name":"weather","arguments":' + arguments + "}"
    assert _run(ForcedToolCalls(), single, step) == ("", [("weather", arguments)])
    many = '[{"name":"clock","arguments":{}},{"name":"weather","arguments":{"city":"]"}}]'
    assert _run(ForcedToolCalls(), many, step) == ("", [("clock", "{}"), ("weather", '{"city":"]"}')])


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_auto_output_finds_the_models_own_syntax(step: int) -> None:
    hermes = 'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parser = AutoToolCalls(NAMES)
    assert _run(parser, hermes, step) == ("Let me check.\n", [("weather", '{"city": "Paris"}')])
    assert parser.finish_reason("stop") == "tool_calls" and parser.finish_reason("length") == "length"
    llama = ' {"name": "clock", "parameters": {}}'
    assert _run(AutoToolCalls(NAMES), llama, step) == ("", [("clock", "{}")])
    for plain in ("The answer is <b>42</b>.", '{"city": "Paris"}', 'Use {"name": "weather"} later.'):
        parser = AutoToolCalls(NAMES)
        assert _run(parser, plain, step) == (plain, [])
        assert parser.finish_reason("stop") == "stop"
    # an unknown function, or a call that does not parse, is left as text
    unknown = '<tool_call>{"name": "rocket", "arguments": {}}</tool_call>'
    assert _run(AutoToolCalls(NAMES), unknown, step) == (unknown, [])


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_auto_json_streams_once_it_cannot_be_a_call(step: int) -> None:
    """A reply that starts as JSON is held only while it may be a bare call of a tool: once it cannot
    be, everything so far comes out of feed() as content, before the end."""
    for reply, shown_after in (
        ('{"city": "Paris", "population": 2102650}', len('{"c')),  # the first key is not "name"
        ('{"name": "Paris", "country": "France"}', len('{"name": "P')),  # no tool's name starts so
        ('{"name": "clockwork", "gears": 3}', len('{"name": "clockw')),  # past a tool's name
        ("[1, 2, 3]", len("[1")),
    ):
        parser = AutoToolCalls(NAMES)
        streamed = ""
        for i in range(0, len(reply), step):
            streamed += parser.feed(reply[i : i + step])[0]
            fed = min(i + step, len(reply))
            assert streamed == ("" if fed < shown_after else reply[:fed]), (reply, fed, streamed)
        assert parser.close() == ("", []) and streamed == reply
    # a call of a tool is held to the end, whitespace or a list around it
    for call in ('{ "name" : "weather", "arguments": {"city": "Rome"}}', '[{"name":"clock","arguments":{}}]'):
        parser = AutoToolCalls(NAMES)
        assert all(parser.feed(call[i : i + step]) == ("", []) for i in range(0, len(call), step))
        content, deltas = parser.close()
        assert content == "" and [d.function.name for d in deltas] in (["weather"], ["clock"])


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_auto_tagged_calls_are_sent_as_they_close(step: int) -> None:
    first = '<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>'
    rocket = '<tool_call>{"name": "rocket", "arguments": {}}</tool_call>'  # not a tool: stays text
    second = '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    reply = "Checking.\n" + first + "\n\n" + rocket + " then " + second + "\n Done."
    parser = AutoToolCalls(NAMES)
    content, calls, seen_at = "", [], {}
    for i in range(0, len(reply), step):
        c, d = parser.feed(reply[i : i + step])
        content, calls = content + c, calls + d
        for delta in d:
            seen_at[delta.function.name] = min(i + step, len(reply))
    tail, more = parser.close()
    assert more == [] and content + tail == "Checking.\n" + rocket + " then " + "Done."
    whole = [(c.function.name, c.function.arguments) for c in tool_calls_of(calls)]
    assert whole == [("clock", "{}"), ("weather", '{"city": "Oslo"}')]
    # each call came out of feed() as soon as its closing tag had arrived
    assert seen_at["clock"] - len("Checking.\n" + first) < step
    assert seen_at["weather"] - reply.index(second) - len(second) < step
    assert parser.finish_reason("stop") == "tool_calls"


def test_parse_tool_calls_takes_several_tagged_calls() -> None:
    text = '<tool_call>{"name":"clock","arguments":{}}</tool_call>'
    text += '<tool_call>{"name":"weather","arguments":"{\\"city\\":\\"Rome\\"}"}</tool_call>'  # as JSON text
    assert parse_tool_calls(text, NAMES) == (None, [("clock", "{}"), ("weather", '{"city": "Rome"}')])


def test_plans() -> None:
    assert plan_tools(None, None, True) is None
    auto = plan_tools(TOOLS, None, True)
    assert auto.choice == "auto" and not auto.forced and auto.names == NAMES
    assert auto.tools[1]["function"]["parameters"]["properties"] == {}  # no parameters: an empty object
    named = plan_tools(
        TOOLS, NamedToolChoice.model_validate({"type": "function", "function": {"name": "weather"}}), True
    )
    assert named.schema["properties"]["name"] == {"const": "weather"}
    assert named.schema["properties"]["arguments"] == PARAMS
    required = plan_tools(TOOLS, "required", False)
    assert required.schema["type"] == "array" and required.schema["maxItems"] == 1
    assert len(required.schema["items"]["anyOf"]) == 2
    for tools, choice in (
        (TOOLS, NamedToolChoice.model_validate({"type": "function", "function": {"name": "nope"}})),
        (TOOLS, "always"),
        (None, "required"),
        ([TOOLS[0], TOOLS[0]], None),
        (
            [
                Tool.model_validate(
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                )
            ],
            None,
        ),
    ):
        with pytest.raises(APIError) as info:
            plan_tools(tools, choice, True)
        assert info.value.status == 400


HISTORY = [
    ChatMessage.model_validate(m)
    for m in (
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_1", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Windy"},
    )
]
# a minimal template in the Hermes/Qwen style: it reads tools, tool_calls and the tool role itself
TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL:{{ c.function.name }}{{ c.function.arguments | tojson }}"
    "{% endfor %}"
    "{% if m.tool_call_id %}FOR:{{ m.tool_call_id }}{% endif %}\n{% endfor %}"
)


@pytest.fixture(scope="module")
def serving_tokenizer():
    from flashdecode.models.loader import load_model

    return load_model().tokenizer


def _serving(tokenizer) -> OpenAIServing:
    serving = object.__new__(OpenAIServing)  # render_chat needs only the tokenizer
    serving.tokenizer = tokenizer
    return serving


def test_history_renders_inline_for_a_template_without_tools(serving_tokenizer) -> None:
    assert not serving_tokenizer.chat_template_takes_tools
    plan = plan_tools(TOOLS, None, True)
    text = _serving(serving_tokenizer).render_chat(HISTORY, True, plan.tools)
    assert text.index("<tools>") < text.index("Weather in Paris?")
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    # consecutive tool results: one user turn
    assert "<|im_start|>user\n<tool_response>\nSunny\n</tool_response>\n<tool_response>\nWindy" in text
    assert "<|im_start|>tool" not in text


def test_history_renders_natively_for_a_template_with_tools(serving_tokenizer) -> None:
    tokenizer = copy.copy(serving_tokenizer)
    tokenizer.chat_template = TOOL_TEMPLATE
    assert tokenizer.chat_template_takes_tools
    plan = plan_tools(TOOLS, None, True)
    text = _serving(tokenizer).render_chat(HISTORY, False, plan.tools)
    assert text.startswith("TOOLS:[") and '"name": "weather"' in text.splitlines()[0]
    assert 'CALL:weather{"city": "Paris"}' in text  # arguments reach the template as an object
    assert "<tool>SunnyFOR:call_1" in text and "<tool>WindyFOR:call_2" in text


def test_inline_tools_keeps_a_system_message_first() -> None:
    out = inline_tools([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], [])
    assert out[0] == {"role": "system", "content": "Be brief."}
    plan = plan_tools(TOOLS, None, True)
    out = inline_tools([{"role": "system", "content": "Be brief."}], plan.tools)
    assert len(out) == 1 and out[0]["content"].startswith("Be brief.\n\n# Tools")
