"""Every failure comes back as `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import json
import time

import openai
import pytest

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def _error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"messages": MESSAGES, "n": 2}, "n"),
        ({"messages": MESSAGES, "temperature": -1}, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "logprobs": True}, "logprobs"),
        ({"messages": []}, "messages"),
        ({}, "messages"),  # FastAPI's 422 becomes an OpenAI 400
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
        ({"messages": MESSAGES, "kv_policy": {"name": "nope"}}, "kv_policy"),
        ({"messages": MESSAGES, "kv_policy": {"name": "snapstream", "budget": -1}}, "kv_policy"),
        ({"messages": MESSAGES, "kv_policy": {"name": "snapstream", "budget": 64, "bogus": 1}}, "kv_policy"),
        # tool calling (tests/server/test_tools.py): a tool needs a name, a tool_choice needs tools; the
        # legacy functions API is refused, never silently answered as plain text
        ({"messages": MESSAGES, "tools": [{"type": "function", "function": {}}]}, "tools"),
        ({"messages": MESSAGES, "tool_choice": "auto"}, "tool_choice"),
        ({"messages": MESSAGES, "functions": [{"name": "f"}]}, "functions"),
        ({"messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format"),
        ({"messages": MESSAGES, "response_format": {"type": "json_schema"}}, "response_format"),
        (
            {
                "messages": MESSAGES,
                "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}},
            },
            "response_format",
        ),
    ],
)
def test_invalid_parameters_are_400(server, payload, param):
    err = _error(server.http.post(CHAT, json=payload), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param


BAD_SAMPLING = [
    ({"seed": 2**70}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -1}, "seed"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "route, body", [(CHAT, {"messages": MESSAGES}), ("/v1/completions", {"prompt": "hi"})]
)
@pytest.mark.parametrize(("bad", "param"), BAD_SAMPLING)
def test_out_of_range_sampling_is_400_naming_the_field(server, route, body, stream, bad, param):
    """Python's json writes Infinity/NaN and big ints, as some clients do; none may reach the engine (was 500)."""
    content = json.dumps({**body, "max_tokens": 2, "stream": stream, **bad})
    resp = server.http.post(route, content=content, headers={"content-type": "application/json"})
    err = _error(resp, 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_largest_seed_is_served(server):
    out = server.client().completions.create(model="tiny-llama", prompt="hi", max_tokens=2, seed=2**63 - 1)
    assert out.choices[0].text is not None


def test_malformed_json_and_bad_prompts_are_400(server):
    err = _error(
        server.http.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"}), 400
    )
    assert "JSON" in err["message"]
    _error(server.http.post("/v1/completions", json={"prompt": ["a", "b"]}), 400)  # several prompts
    _error(server.http.post("/v1/completions", json={"prompt": [1, 99999]}), 400)  # out of vocabulary
    _error(server.http.post("/v1/completions", json={"prompt": ""}), 400)  # empty


def test_prompt_too_long_is_400_context_length_exceeded(server):
    err = _error(server.http.post("/v1/completions", json={"prompt": "x" * 600, "max_tokens": 4}), 400)
    assert err["code"] == "context_length_exceeded"
    err = _error(server.http.post("/v1/completions", json={"prompt": "x" * 10, "max_tokens": 600}), 400)
    assert err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="tiny-llama", prompt="x" * 600, max_tokens=4)


def test_unknown_model_and_route_are_404(server):
    err = _error(server.http.post(CHAT, json={"model": "gpt-4", "messages": MESSAGES}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    _error(server.http.get("/v1/nothing"), 404)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4", messages=MESSAGES)


def test_api_key_is_required_on_v1_only(serve):
    with serve(max_model_len=128, api_key="s3cret") as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            err = _error(s.http.post(CHAT, json={"messages": MESSAGES}, headers=headers), 401)
            assert err["code"] == "invalid_api_key"
        _error(s.http.get("/v1/models"), 401)
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("s3cret").chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=2)
        assert s.http.get("/health").status_code == 200 and s.http.get("/metrics").status_code == 200


def _wait_health(server, key: str, value: int) -> None:
    deadline = time.monotonic() + 10
    while server.http.get("/health").json()[key] != value:
        assert time.monotonic() < deadline, f"/health never reported {key}={value}"
        time.sleep(0.01)


def test_full_waiting_queue_is_429_with_retry_after(serve):
    with serve(max_model_len=2048, max_batch_size=1, max_waiting=1) as s:
        long = {"prompt": "busy", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with s.http.stream("POST", "/v1/completions", json=long) as running:
            _wait_health(s, "running", 1)
            with s.http.stream("POST", "/v1/completions", json=long) as waiting:
                _wait_health(s, "waiting", 1)
                assert running.status_code == waiting.status_code == 200
                resp = s.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                err = _error(resp, 429)
                # two 2000-token requests hold the one slot and the queue: far more than "1 s"
                assert int(resp.headers["retry-after"]) > 1 and err["code"] == "rate_limit_exceeded"
                with pytest.raises(openai.RateLimitError):
                    s.client().completions.create(model="tiny-llama", prompt="x", max_tokens=2)
        s.wait_idle()  # closing both streams aborted them
        assert s.client().completions.create(model="tiny-llama", prompt="x", max_tokens=2).choices


@pytest.mark.parametrize(
    ("raw", "status", "param"),
    [
        (b'{"model": "\\ud800", "prompt": "x", "max_tokens": 2}', 400, "model"),  # 404 echoed it: 500
        (b'{"prompt": "a\\ud800b", "max_tokens": 2}', 400, "prompt"),
        (b'{"prompt": "x", "stop": ["\\udfff"], "max_tokens": 2}', 400, "stop"),
        (b'{"prompt": "x", "user": "\\ud800", "max_tokens": 2}', 400, "user"),  # even an ignored field
    ],
)
def test_lone_surrogates_are_a_clean_error_not_a_500(server, raw, status, param):
    """JSON may escape half a UTF-16 pair; Python then holds a string no UTF-8 encoder takes (the error
    handler itself crashed with a 500 echoing such a model name, found by bench/robustness.py)."""
    resp = server.http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert _error(resp, status)["param"] == param


def test_a_lone_surrogate_in_a_chat_message_is_400(server):
    raw = b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'
    resp = server.http.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert _error(resp, 400)["param"] == "messages"


def test_an_error_quoting_a_lone_surrogate_still_renders():
    from longserve.server.errors import APIError, error_response

    resp = error_response(APIError("the model '\ud800' does not exist", status_code=404, param="model"))
    assert (
        resp.status_code == 404
        and json.loads(resp.body)["error"]["message"] == "the model '\ud800' does not exist"
    )


def test_a_message_without_content_is_an_empty_message():
    """SmolLM2's template indexes message['content']: a message without it was a 400 from the template
    (schemathesis: the schema says content is optional)."""
    from longserve.server.protocol import ChatCompletionRequest

    body = ChatCompletionRequest(messages=[{"role": "user"}])
    assert body.messages[0].content == ""
