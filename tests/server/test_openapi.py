"""/openapi.json describes what the server does (issue 16: it documented 422 where the server sends 400,
and /metrics as JSON), and the model endpoints follow OpenAI's (retrieve was a 404)."""

from __future__ import annotations

import json

import openai
import pytest

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def schema(server) -> dict:
    return server.http.get("/openapi.json").json()


def test_retrieve_model_returns_the_listed_object_and_404_for_unknown(server):
    listed = server.http.get("/v1/models").json()["data"][0]
    got = server.http.get("/v1/models/tiny-llama")
    assert got.status_code == 200
    assert {k: v for k, v in got.json().items() if k != "created"} == {
        k: v for k, v in listed.items() if k != "created"
    }
    assert server.client().models.retrieve("tiny-llama").id == "tiny-llama"
    missing = server.http.get("/v1/models/gpt-4")
    assert missing.status_code == 404
    assert (
        missing.json()["error"]["code"] == "model_not_found" and missing.json()["error"]["param"] == "model"
    )
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("org/gpt-4")  # a slash in the id reaches the route, not a 404 page


def test_schema_documents_400_not_422(schema):
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    for path in (CHAT, "/v1/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        for status in ("400", "401", "404", "413", "429", "500"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse", (path, status)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    error = schema["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    assert "404" in schema["paths"]["/v1/models/{model}"]["get"]["responses"]


def test_metrics_is_documented_and_served_as_text(server, schema):
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert server.http.get("/metrics").headers["content-type"].startswith("text/plain")


def test_schema_carries_this_servers_limits(schema):
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["max_tokens"]["anyOf"][0]["maximum"] == 511  # max_model_len 512
    ids = props["prompt"]["anyOf"][1]["items"]
    assert (ids["minimum"], ids["maximum"]) == (0, 256)  # the tiny vocabulary
    assert props["speculative"]["enum"] == [False, None]  # no --draft
    assert props["n"]["enum"] == [1] and props["echo"]["enum"] == [False]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [[True]]}, "prompt"),  # lax validation took true as token 1
        ({"prompt": "hi", "stream": 0}, "stream"),
        ({"prompt": "hi", "max_tokens": "3"}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        (
            {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": None}},
            "response_format",
        ),
    ],
)
def test_bodies_the_schema_rejects_are_400(server, body, param):
    resp = server.http.post("/v1/completions", json=body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_chat_logprobs_zero_is_not_false(server):
    resp = server.http.post(CHAT, json={"messages": [{"role": "user", "content": "x"}], "logprobs": 0})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "logprobs"


def test_integral_floats_are_integers_as_in_json_schema(server):
    resp = server.http.post("/v1/completions", json={"prompt": [[104.0, 105]], "max_tokens": 2.0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == 2 and resp.json()["usage"]["completion_tokens"] <= 2


def test_an_overridden_max_tokens_must_still_fit(server):
    """Chat's max_completion_tokens wins over max_tokens, but the schema bounds both: both are checked."""
    body = {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2, "max_tokens": 600}
    resp = server.http.post(CHAT, json=body)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert "max_tokens (600)" in resp.json()["error"]["message"]
