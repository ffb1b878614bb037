"""`response_format` and the penalties through the OpenAI client: honoured, not silently ignored (they
were accepted and answered with the unconstrained, unpenalized text)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")

MESSAGES = [{"role": "user", "content": "a json please"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["city", "n"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


def _check(value: dict) -> None:
    assert set(value) == {"city", "n"} and value["city"] in ("Paris", "Rome") and 0 <= value["n"] <= 99


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_chat_output_matches_the_schema(server, temperature):
    r = server.client().chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,
        response_format=JSON_SCHEMA,
        temperature=temperature,
        seed=1,
        max_tokens=100,
    )
    assert r.choices[0].finish_reason == "stop"
    _check(json.loads(r.choices[0].message.content))


def test_json_schema_streams_and_completions_accept_it(server):
    client = server.client()
    chunks = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, response_format=JSON_SCHEMA, max_tokens=100, stream=True
    )
    _check(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)))
    out = client.completions.create(
        model="tiny-llama", prompt="x", max_tokens=100, extra_body={"response_format": JSON_SCHEMA}
    )
    _check(json.loads(out.choices[0].text))


def test_json_object_mode_and_text_mode(server):
    client = server.client()
    kwargs = dict(model="tiny-llama", messages=MESSAGES, max_tokens=60, temperature=0)
    obj = client.chat.completions.create(response_format={"type": "json_object"}, **kwargs)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    text = client.chat.completions.create(response_format={"type": "text"}, **kwargs)
    plain = client.chat.completions.create(**kwargs)
    assert text.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(json.JSONDecodeError):  # the premise: unconstrained, this model writes no JSON
        json.loads(plain.choices[0].message.content)


def test_penalties_change_a_greedy_answer(server):
    """The random model repeats itself under greedy decoding; a frequency penalty must break that."""
    client = server.client()
    kwargs = dict(
        model="tiny-llama", prompt="aaaa", temperature=0, max_tokens=40, extra_body={"ignore_eos": True}
    )
    plain = client.completions.create(**kwargs).choices[0].text
    freq = client.completions.create(frequency_penalty=2.0, **kwargs).choices[0].text
    pres = client.completions.create(presence_penalty=2.0, **kwargs).choices[0].text
    assert freq != plain and pres != plain
    assert len(set(freq)) > len(set(plain))  # penalized repeats: more distinct characters
    server.wait_idle()
