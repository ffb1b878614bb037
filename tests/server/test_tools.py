"""OpenAI tool calling: validation (400 naming the field), rendering through a template that knows tools
(Qwen2.5) and the fallback system message (SmolLM2, no template), a required/named call constrained to a
valid call, parsing of `<tool_call>` and bare-JSON output, and the streamed `delta.tool_calls` shape.
The random tiny model cannot choose to call a tool, so "auto" is driven end to end by a response_format
that makes it write a bare JSON call; the integration test at the end uses a real model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from longserve.server.protocol import ChatCompletionRequest
from longserve.server.serving_engine import ServerState
from longserve.server.tools import ToolParser, parse_tool_output

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
MODELS = Path.home() / ".cache" / "longserve" / "models"


@pytest.fixture(scope="module")
def server(serve):
    """The byte tokenizer spends a token per character of the listed tools: a longer context."""
    with serve(max_model_len=2048) as s:
        yield s


def _valid_weather(args: dict) -> bool:
    return set(args) == {"city", "days"} and args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 7


def _valid_call(name: str, arguments: str) -> bool:
    """The call names a tool and its arguments (a JSON string) match that tool's schema."""
    args = json.loads(arguments)
    if name == "get_weather":
        return _valid_weather(args)
    return name == "get_time" and args in ({"zone": "UTC"}, {"zone": "CET"})


def _request(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **body})


# ------------------------------------------------------------------------------------------ validation


def _tool(**function) -> dict:
    return {"type": "function", "function": function}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [_tool(description="no name")]}, "tools"),
        ({"tools": [_tool(name="has space")]}, "tools"),
        ({"tools": [_tool(name="f", parameters={"type": "string"})]}, "tools"),
        ({"tools": [_tool(name="f", parameters="object")]}, "tools"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [WEATHER], "parallel_tool_calls": 1}, "parallel_tool_calls"),
        ({"functions": [{"name": "f"}]}, "functions"),  # the legacy API stays refused
        ({"function_call": "auto"}, "function_call"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        # a schema the grammar compiler refuses, found when the call is constrained
        (
            {
                "tools": [_tool(name="f", parameters={"properties": {"x": {"type": 7}}})],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(server, body, param):
    resp = server.http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 4, **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.text


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "sunny"}],  # a tool result must say which call it answers
        [{"role": "user", "content": "x", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}],
    ],
)
def test_bad_tool_messages_are_400(server, messages):
    resp = server.http.post(CHAT, json={"messages": messages, "max_tokens": 4})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages", resp.text


def test_tools_on_completions_are_refused(server):
    resp = server.http.post("/v1/completions", json={"prompt": "x", "tools": [WEATHER]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tools"
    assert "chat/completions" in resp.json()["error"]["message"]


def test_tool_modes():
    assert _request().tool_mode == "none" and _request(tool_choice="none").tool_mode == "none"
    assert _request(tools=[WEATHER]).tool_mode == "auto" and not _request(tools=[WEATHER]).constrained
    assert _request(tools=[WEATHER], tool_choice="none").tool_mode == "none"
    required = _request(tools=[WEATHER, TIME], tool_choice="required")
    assert required.constrained and [t.function.name for t in required.forced_tools] == [
        "get_weather",
        "get_time",
    ]
    named = _request(
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}
    )
    assert named.tool_mode == "named" and [t.function.name for t in named.forced_tools] == ["get_time"]


# ------------------------------------------------------------------------------------------ rendering


def _state(tokenizer) -> ServerState:
    """Enough of a ServerState to render prompts with `tokenizer` (no model)."""

    def encode(messages):
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]

    llm = SimpleNamespace(tokenizer=tokenizer, encode=encode)
    return ServerState(llm, None, None, None, "m", frozenset(), None)


LOOP = [
    *MESSAGES,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sunny"}'},
]


def _tokenizer(name: str):
    if not (MODELS / name / "tokenizer.json").exists():
        pytest.skip(f"{name} is not in the model cache")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODELS / name)


def test_a_template_that_knows_tools_renders_them_and_the_tool_loop():
    tok = _tokenizer("qwen2.5-coder-0.5b-instruct")
    state = _state(tok)
    text = tok.decode(state.chat_prompt_ids(_request(messages=LOOP, tools=[WEATHER])))
    assert "<tools>" in text and '"name": "get_weather"' in text and '"enum": ["Paris", "Rome"]' in text
    # the earlier call is written with its arguments as an object (a JSON string would be quoted twice)
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
        in text
    )
    assert '<tool_response>\n{"forecast": "sunny"}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = tok.decode(state.chat_prompt_ids(_request(messages=LOOP, tools=[WEATHER], tool_choice="none")))
    assert "<tools>" not in plain and "<tool_response>" in plain  # "none": no tools offered, history kept


def test_a_template_without_tools_gets_the_fallback_system_message():
    tok = _tokenizer("smollm2-135m-instruct")
    state = _state(tok)
    assert not state.native_tools()
    text = tok.decode(
        state.chat_prompt_ids(
            _request(messages=[{"role": "system", "content": "Be brief."}, *LOOP], tools=[WEATHER])
        )
    )
    system = text.split("<|im_end|>")[0]
    assert "Be brief." in system and "<tools>" in system and '"name": "get_weather"' in system
    assert "<tool_call>" in system  # the format it is asked to answer in
    assert '"arguments": {"city": "Paris", "days": 2}' in text and "<tool_response>" in text


def test_no_template_lists_the_tools_too(server):
    request = _request(messages=LOOP, tools=[WEATHER])
    text = bytes(i for i in server.state.chat_prompt_ids(request) if i < 256).decode()
    assert text.startswith("system: # Tools") and '"name": "get_weather"' in text
    assert "assistant: <tool_call>" in text and "user: <tool_response>" in text


# ------------------------------------------------------------------------------------------ constrained calls


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_required_call_is_a_valid_call(server, temperature):
    r = server.client().chat.completions.create(
        model="tiny-llama", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required",
        temperature=temperature, seed=3, max_tokens=150,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert _valid_call(call.function.name, call.function.arguments)


def test_named_call_calls_that_function(server):
    r = server.client().chat.completions.create(
        model="tiny-llama", messages=MESSAGES, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=150,
    )  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and _valid_call("get_time", call.function.arguments)


def test_a_tool_without_parameters_gets_empty_arguments(server):
    r = server.client().chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,
        tools=[_tool(name="ping")],
        tool_choice="required",
        max_tokens=60,
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "ping" and json.loads(call.function.arguments) == {}


def _sse(server, body: dict) -> list[dict]:
    with server.http.stream("POST", CHAT, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_call_has_openais_shape(server):
    chunks = _sse(
        server, {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 150}
    )
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("content" not in d for d in deltas[1:])  # the call's text is not also sent as content
    (head,), *pieces = calls
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert len(pieces) > 1  # the arguments stream as they are generated (a byte per token here)
    assert all(set(a) == {"index", "function"} and a["index"] == 0 for (a,) in pieces)
    assert all(set(a["function"]) == {"arguments"} for (a,) in pieces)
    arguments = "".join(a["function"]["arguments"] for (a,) in pieces)
    assert _valid_weather(json.loads(arguments))
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_client_accumulates_the_streamed_call(server):
    stream = server.client().chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=150,
        stream=True,
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            name += call.function.name or ""
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and _valid_weather(json.loads(arguments)) and finish == "tool_calls"


# ------------------------------------------------------------------------------------------ auto: parsing

BARE_CALL_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "call",
        "schema": {
            "type": "object",
            "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER["function"]["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_auto_turns_a_bare_json_call_into_tool_calls(server, stream):
    body = {"messages": MESSAGES, "tools": [WEATHER], "response_format": BARE_CALL_FORMAT, "max_tokens": 150}
    if stream:
        chunks = _sse(server, body)
        calls = [d["tool_calls"][0] for c in chunks if "tool_calls" in (d := c["choices"][0]["delta"])]
        assert calls[0]["function"]["name"] == "get_weather"
        arguments, finish = calls[1]["function"]["arguments"], chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = server.http.post(CHAT, json=body).json()["choices"][0]
        assert choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        arguments, finish = call["function"]["arguments"], choice["finish_reason"]
    assert _valid_weather(json.loads(arguments)) and finish == "tool_calls"


def test_auto_without_a_call_is_plain_content(server):
    """The random model writes no call: its text comes back as content (never a 500)."""
    body = {"messages": MESSAGES, "max_tokens": 30, "temperature": 0}
    with_tools = server.http.post(CHAT, json={**body, "tools": [WEATHER]}).json()["choices"][0]
    assert "tool_calls" not in with_tools["message"] and with_tools["finish_reason"] in ("stop", "length")
    assert isinstance(with_tools["message"]["content"], str) and with_tools["message"]["content"]


def test_multi_turn_tool_loop_is_answered(server):
    r = server.http.post(CHAT, json={"messages": LOOP, "tools": [WEATHER], "max_tokens": 8})
    assert r.status_code == 200, r.text


AUTO = {"tools": [WEATHER, TIME]}


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}\n</tool_call>', None,
         [("get_weather", {"city": "Rome", "days": 1})]),
        ('Let me check.\n<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>\n',
         "Let me check.", [("get_time", {"zone": "UTC"})]),  # stringified arguments are accepted
        ('<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call><tool_call>{"name": '
         '"get_weather", "arguments": {}}</tool_call>', None, [("get_time", {"zone": "CET"}), ("get_weather", {})]),
        (' {"name": "get_time", "parameters": {"zone": "UTC"}}', None, [("get_time", {"zone": "UTC"})]),
        ('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}', None, [("get_time", {"zone": "UTC"})]),
        ('{"name": "unknown_tool", "arguments": {}}', '{"name": "unknown_tool", "arguments": {}}', []),
        ('{"city": "Paris"}', '{"city": "Paris"}', []),
        ("say <tool_call> not json </tool_call> ok", "say <tool_call> not json </tool_call> ok", []),
        ('<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>',
         '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>', []),
        ("a < b <tool", "a < b <tool", []),
    ],
)  # fmt: skip
def test_parse_tool_output(text, content, calls):
    request = _request(**AUTO)
    got_content, got = parse_tool_output(text, request)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(c.id.startswith("call_") for c in got) and len({c.id for c in got}) == len(got)
    events = _streamed(text, request)  # one character at a time: the same calls, arguments as written
    assert [(v.name, v.arguments) for k, v in events if k in ("call", "done")] == [
        (c.name, c.arguments) for c in got
    ]
    if not calls:  # no call: every character comes back as content
        assert "".join(v for k, v in events if k == "content") == text


def _streamed(text: str, request) -> list:
    parser, events = ToolParser(request, incremental=True), []
    for ch in text:
        events += parser.feed(ch)
    return events + parser.finish()


def test_a_streamed_call_is_announced_before_its_arguments_end():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'
    events = _streamed(text, _request(**AUTO))
    kinds = [k for k, _ in events]
    assert kinds[0] == "head" and kinds[-1] == "done" and set(kinds[1:-1]) == {"args"}
    assert "".join(v for k, v in events if k == "args") == '{"city": "Rome", "days": 2}'
    # once announced, a call stays one (vLLM does the same): a block broken after its arguments is still
    # the call in a stream, while the whole answer parsed at once is plain content
    broken = text.replace("}}\n", "}, oops}\n")
    assert [k for k, _ in _streamed(broken, _request(**AUTO))][-1] == "done"
    assert parse_tool_output(broken, _request(**AUTO)) == (broken, [])


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    _, calls = parse_tool_output(text, _request(**AUTO, parallel_tool_calls=False))
    assert [c.name for c in calls] == ["get_time"]


# ------------------------------------------------------------------------------------------ a real model


@pytest.mark.integration
def test_qwen_calls_get_weather_through_the_openai_client():
    """Qwen2.5-Coder-0.5B-Instruct (its template knows tools): "required" and "auto" both return a
    get_weather call for Paris; given the tool's answer, it replies in text."""
    from longserve.llm import LLM
    from longserve.server.app import create_app
    from tests.server.conftest import LiveServer

    if not (MODELS / "qwen2.5-coder-0.5b-instruct" / "config.json").exists():
        pytest.skip("qwen2.5-coder-0.5b-instruct is not in the model cache")
    llm = LLM("qwen2.5-coder-0.5b-instruct", progress=False, max_batch_size=2)
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "the city name"}},
                "required": ["city"],
            },
        },
    }
    messages = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
    with LiveServer(create_app(llm, max_model_len=2048)) as server:
        client = server.client()
        for choice in ("required", "auto"):
            r = client.chat.completions.create(
                model="qwen2.5-coder-0.5b-instruct", messages=messages, tools=[tool], tool_choice=choice,
                temperature=0, max_tokens=80,
            )  # fmt: skip
            assert r.choices[0].finish_reason == "tool_calls", (choice, r.choices[0].message)
            (call,) = r.choices[0].message.tool_calls
            assert call.function.name == "get_weather"
            assert "paris" in json.loads(call.function.arguments)["city"].lower()
        stream = client.chat.completions.create(
            model="qwen2.5-coder-0.5b-instruct", messages=messages, tools=[tool], tool_choice="auto",
            temperature=0, max_tokens=80, stream=True,
        )  # fmt: skip
        pieces, finish = [], None
        for chunk in stream:
            pieces += [
                (c.function.name, c.function.arguments) for c in chunk.choices[0].delta.tool_calls or []
            ]
            finish = chunk.choices[0].finish_reason or finish
        assert pieces[0] == ("get_weather", "") and finish == "tool_calls"
        assert "".join(a for _, a in pieces) == call.function.arguments  # the same call as unstreamed
        turn = [
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'},
        ]
        r = client.chat.completions.create(
            model="qwen2.5-coder-0.5b-instruct", messages=turn, tools=[tool], temperature=0, max_tokens=60
        )
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content
        assert "18" in r.choices[0].message.content or "sunny" in r.choices[0].message.content.lower()


NASTY = [None, True, 0, -1, 2.5, 2**70, float("nan"), "", "auto", "x" * 100, [], {}, [[]], [None], [{}],
         {"type": "function"}, {"type": "function", "function": {"name": 7}}, [{"type": "function", "function": None}],
         [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}],
         [{"type": "function", "function": {"name": "f", "parameters": {"type": ["object", "null"]}}}]]  # fmt: skip


@pytest.mark.parametrize(
    "field", ["tools", "tool_choice", "parallel_tool_calls", "tool_calls", "tool_call_id"]
)
def test_fuzzed_tool_fields_are_answered_or_refused_never_500(server, field):
    for value in NASTY:
        for choice in ("auto", "required"):
            body = {
                "messages": [dict(MESSAGES[0])],
                "tools": [WEATHER],
                "tool_choice": choice,
                "max_tokens": 2,
            }
            if field in ("tool_calls", "tool_call_id"):
                body["messages"].append(
                    {"role": "assistant" if field == "tool_calls" else "tool", field: value}
                )
            else:
                body[field] = value
            resp = server.http.post(CHAT, content=json.dumps(body))
            assert resp.status_code in (200, 400), (field, value, resp.text)
    server.wait_idle()
