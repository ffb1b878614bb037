"""Oversized bodies are refused with 413 before the app reads them, declared or streamed."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI, Request

from longserve.errors import LongserveError
from longserve.server.errors import error_response
from longserve.server.limits import BodyLimit


def app() -> BodyLimit:
    inner = FastAPI()
    inner.add_exception_handler(LongserveError, lambda _, exc: error_response(exc))
    seen = []

    @inner.post("/echo")
    async def echo(request: Request):
        body = await request.body()
        seen.append(len(body))
        return {"bytes": len(body)}

    wrapped = BodyLimit(inner, max_bytes=1000)
    wrapped.seen = seen
    return wrapped


def post(application, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/echo", **kwargs)

    return asyncio.run(go())


def test_small_bodies_pass():
    application = app()
    assert post(application, content=b"x" * 1000).json() == {"bytes": 1000}


def test_a_declared_large_body_is_refused_unread():
    application = app()
    resp = post(application, content=b"x" * 5000)
    assert resp.status_code == 413 and application.seen == []
    err = resp.json()["error"]
    assert err["code"] == "request_too_large" and "1000 bytes" in err["message"]


def test_a_streamed_large_body_is_refused():
    async def chunks():
        for _ in range(10):
            yield b"y" * 300

    application = app()
    resp = post(application, content=chunks())
    assert resp.status_code == 413 and application.seen == []
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_the_server_refuses_a_10mb_body_and_stays_responsive(serve):
    import threading
    import time

    with serve(max_model_len=512, max_request_bytes=1 << 20) as s:
        big = b'{"prompt": "' + b"x" * (10 << 20) + b'", "max_tokens": 2}'
        result = {}

        def send():
            result["resp"] = s.http.post(
                "/v1/completions", content=big, headers={"content-type": "application/json"}
            )

        sender = threading.Thread(target=send)
        sender.start()
        start = time.perf_counter()
        health = s.http.get("/health")
        assert health.status_code == 200 and time.perf_counter() - start < 1.0
        sender.join(60)
        assert result["resp"].status_code == 413
        assert result["resp"].json()["error"]["code"] == "request_too_large"
        ok = s.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
