"""Tool calling through the OpenAI server (``edgephi.runtime.tools``), with the real client.

SmolLM2's template knows no tools, so its calls take the Hermes format with a system note
of ours; a tiny Qwen2.5 carrying Qwen2.5-Instruct's own template shows the template path
(the tools rendered by the template, a call turn and a tool turn in its own words).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import tiny
from conftest import build_bundle, serving
from edgephi.runtime import load, tools
from edgephi.runtime.engine import Engine
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.server import ModelServer
from edgephi.runtime.store import Store
from test_server import raw

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def bounded(tool: dict) -> dict:  # type: ignore[type-arg]
    """``tool`` with every string parameter at most 16 characters long."""
    parameters = json.loads(json.dumps(tool["function"]["parameters"]))
    for schema in parameters["properties"].values():
        if schema.get("type") == "string":
            schema["maxLength"] = 16
    return {**tool, "function": {**tool["function"], "parameters": parameters}}


QWEN25_TEMPLATE = Path(__file__).parent / "templates" / "qwen2.5-instruct.jinja"


@pytest.fixture(scope="module")
def server(smol: Engine) -> Iterator[ModelServer]:
    with serving(smol, log_requests=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ModelServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def called(city: str, result: str) -> list[dict]:  # type: ignore[type-arg]
    """ASK, an assistant turn that called get_weather(city), and the tool's ``result``."""
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }
    return [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": result},
    ]


def ask(client: openai.OpenAI, messages: list, **kw: object):  # type: ignore[no-untyped-def,type-arg]
    return client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, temperature=0, max_tokens=60, **kw
    )


def test_a_required_call_comes_back_as_tool_calls_and_its_result_is_answered(client: openai.OpenAI) -> None:
    first = ask(client, ASK, tools=[WEATHER], tool_choice="required")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls  # type: ignore[misc]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}  # the schema held: no invented keys
    # The function's result goes back as a tool turn; the model answers from it.
    result = {
        "role": "tool",
        "tool_call_id": call.id,
        "content": json.dumps({"temperature_c": 21, "sky": "sunny"}),
    }
    second = ask(client, [*ASK, choice.message.model_dump(exclude_none=True), result], tools=[WEATHER])
    answer = second.choices[0].message
    assert not answer.tool_calls and answer.content is not None
    assert "21" in answer.content and "sunny" in answer.content


def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    forced = {"type": "function", "function": {"name": "get_time"}}
    [call] = ask(client, ASK, tools=[WEATHER, TIME], tool_choice=forced).choices[0].message.tool_calls  # type: ignore[misc]
    assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) == {"zone"}


def test_auto_and_none_answer_in_text_when_the_model_does_not_call(client: openai.OpenAI) -> None:
    # SmolLM2-135M answers this one itself (greedy): text, streamed as text.
    auto = ask(client, ASK, tools=[WEATHER])
    # Text, finished as text answers finish (how long the greedy answer runs depends on the CPU).
    assert auto.usage is not None and not auto.choices[0].message.tool_calls
    assert auto.choices[0].finish_reason == ("length" if auto.usage.completion_tokens == 60 else "stop")
    assert "Paris" in (auto.choices[0].message.content or "")
    none = ask(client, ASK, tools=[WEATHER], tool_choice="none")
    assert none.choices[0].message.content == ask(client, ASK).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in ask(client, ASK, tools=[WEATHER], stream=True) if c.choices
    )
    assert streamed == auto.choices[0].message.content


def test_a_streamed_call_is_one_tool_calls_delta(client: openai.OpenAI) -> None:
    whole = ask(client, ASK, tools=[WEATHER], tool_choice="required").choices[0].message.tool_calls[0]  # type: ignore[index]
    chunks = [c for c in ask(client, ASK, tools=[WEATHER], tool_choice="required", stream=True) if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [  # type: ignore[union-attr]
        (0, "get_weather", whole.function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tools": [{"type": "function"}]}, "tools[0] must be"),
        ({"tools": [{"type": "function", "function": {"name": "rm -rf /"}}]}, "1 to 64 letters, digits"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "names 'x'"),
        ({"tools": [WEATHER, WEATHER]}, "names a function twice"),
        ({"tool_choice": "required"}, "'tool_choice' needs 'tools'"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "not both"),
        ({"messages": [*ASK, {"role": "tool", "content": "21"}]}, "needs content and a tool_call_id"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
            "tool_calls must be",
        ),
    ],
)
def test_bad_tool_requests_get_one_clear_400(server: ModelServer, body: dict, message: str) -> None:  # type: ignore[type-arg]
    status, reply, _ = raw(
        server,
        "POST",
        "/v1/chat/completions",
        json.dumps({"messages": ASK, **body}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 400 and message in reply["error"]["message"], reply
    assert "\n" not in reply["error"]["message"]


def test_tools_are_for_chat_completions(server: ModelServer) -> None:
    body = json.dumps({"prompt": "Hi", "tools": [WEATHER]}).encode()
    status, reply, _ = raw(server, "POST", "/v1/completions", body, {"Content-Type": "application/json"})
    assert status == 400 and "/v1/chat/completions" in reply["error"]["message"]


@pytest.mark.parametrize("fmt", [tools.HERMES, tools.LLAMA3, tools.PHI4, tools.MISTRAL], ids=lambda f: f.name)
def test_every_call_format_holds_under_its_grammar(smol: Engine, fmt: tools.CallFormat) -> None:
    """The grammar of each family's format, run by og's llguidance, gives an answer the parser
    reads back as the call."""
    # Strings of at most 16 characters: the grammar then closes the call within max_tokens
    # whatever the greedy path on this CPU (an open-ended city name once ran past 60 tokens).
    request = tools.parse_request([bounded(WEATHER), bounded(TIME)], "required")
    assert request is not None
    prompt = smol.format_prompt(ASK, request.tools)
    options = GenerationOptions(max_tokens=60, temperature=0.0, grammar=tools.grammar(request, fmt))
    text = "".join(smol.stream_prompt(prompt, options))
    calls = tools.parse_answer(text, request, fmt)
    assert calls is not None and len(calls) >= 1, text
    assert all(c.name in ("get_weather", "get_time") for c in calls)
    assert text.startswith(fmt.start or "{")


def test_parse_reads_each_format_and_leaves_text_alone() -> None:
    request = tools.parse_request([WEATHER], "auto")
    assert request is not None
    args = '{"city": "Oslo"}'
    for fmt in (tools.HERMES, tools.LLAMA3, tools.PHI4, tools.MISTRAL):
        written = tools.format_calls([("get_weather", args), ("get_weather", '{"city": "Rome"}')], fmt)
        calls = tools.parse_answer(written, request, fmt)
        expected = (
            [("get_weather", args), ("get_weather", '{"city": "Rome"}')]
            if fmt is not tools.LLAMA3
            else [("get_weather", args)]
        )
        assert [(c.name, c.arguments) for c in calls or []] == expected, fmt.name
    assert tools.parse_answer("It is sunny in Oslo.", request, tools.HERMES) is None
    assert (
        tools.parse_answer('<tool_call>\n{"name": "get_weather", "arguments": {"ci', request, tools.HERMES)
        is None
    )
    assert (
        tools.parse_answer(
            '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', request, tools.HERMES
        )
        is None
    )


def test_formats_are_read_from_the_template() -> None:
    assert tools.call_format(QWEN25_TEMPLATE.read_text()) == (tools.HERMES, True)
    assert tools.call_format(tiny.LLAMA3_TEMPLATE) == (tools.HERMES, False)  # no tools in it
    assert tools.call_format("{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}")[0] is tools.PHI4
    assert tools.call_format("{% if tools %}<|python_tag|>{% endif %}") == (tools.LLAMA3, True)
    assert tools.call_format("{% for t in tools %}[AVAILABLE_TOOLS]{% endfor %}[TOOL_CALLS]") == (
        tools.MISTRAL,
        True,
    )


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    spec = {**tiny.FAMILY_SPECS["qwen2.5"], "chat_template": QWEN25_TEMPLATE.read_text()}
    folder = tiny.tiny_model_from_spec("qwen2.5-tools", spec, "transformers")
    out = build_bundle(folder, tmp_path_factory.mktemp("qwen") / "qwen.phi", name="qwen-tools")
    return load(out, store=Store(tmp_path_factory.mktemp("qwen-store")))


def test_a_template_that_renders_tools_is_used_for_them(qwen: Engine) -> None:
    assert qwen.tool_format == (tools.HERMES, True)
    request = tools.parse_request([WEATHER], "required")
    assert request is not None
    turns = called("Paris", '{"temperature_c": 21}')
    prompt = qwen.format_prompt(turns, request.tools)
    # Qwen2.5's own words: the tools in <tools>, the call as it writes one, the result as a user turn.
    assert "# Tools" in prompt and json.dumps(WEATHER) in prompt
    said = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert f"<|im_start|>assistant\n<tool_call>\n{said}\n</tool_call>" in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temperature_c": 21}\n</tool_response><|im_end|>' in prompt
    assert "You may call one or more functions" in prompt and "exactly so" not in prompt  # not our note


def test_a_random_model_still_returns_a_valid_call_over_the_server(qwen: Engine) -> None:
    """Random weights, and the grammar alone makes the answer a call the client can use."""
    short = json.loads(json.dumps(WEATHER))
    short["function"]["parameters"]["properties"]["city"]["maxLength"] = 12  # random text is long
    with serving(qwen, log_requests=False) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="qwen-tools",
            messages=ASK,
            tools=[short],
            tool_choice="required",
            max_tokens=80,
            temperature=0,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        [call] = choice.message.tool_calls  # type: ignore[misc]
        assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}


def test_earlier_calls_render_without_tools_on_offer(smol: Engine) -> None:
    """tool_choice "none" after a call: the history shows the call and its result, in the
    model's format, and no tool note invites another."""
    prompt = smol.format_prompt(called("Oslo", "12 C, rain"))
    said = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert f"<|im_start|>assistant\n<tool_call>\n{said}\n</tool_call><|im_end|>" in prompt
    assert "<tool_response>\n12 C, rain\n</tool_response>" in prompt
    assert "You may call" not in prompt
