"""A fake OpenAI upstream (echoes what it received) and the proxy, both live on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from longserve.proxy.app import ProxyConfig, create_proxy_app
from longserve.server.background import BackgroundServer
from longserve.specprefill import SpecPrefillConfig, SpeculativePrefill
from tests.specprefill.helpers import fast_tokenizer, tiny_llm


def _prompt_text(body: dict) -> str:
    if "messages" in body:
        return "\n".join(str(m.get("content")) for m in body["messages"])
    return str(body.get("prompt"))


def fake_upstream() -> FastAPI:
    """Answers with a JSON summary of the request: prompt chars, body keys, the prompt's last characters."""
    app = FastAPI()
    app.state.requests = []

    async def generate(request: Request, chat: bool):
        body = await request.json()
        app.state.requests.append({"body": body, "headers": dict(request.headers)})
        prompt = _prompt_text(body)
        if "ERROR418" in prompt:
            return JSONResponse(
                {
                    "error": {
                        "message": "I'm a teapot",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "teapot",
                    }
                },
                status_code=418,
            )
        if "PLAINERROR" in prompt:
            return PlainTextResponse("upstream exploded", status_code=500)
        summary = json.dumps({"chars": len(prompt), "keys": sorted(body), "tail": prompt[-30:]})
        usage = {
            "prompt_tokens": len(prompt) // 4,
            "completion_tokens": 3,
            "total_tokens": len(prompt) // 4 + 3,
        }
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": summary}, "finish_reason": "stop"}
                if chat
                else {"index": 0, "text": summary, "finish_reason": "stop"}
            )
            return {
                "id": "x",
                "object": kind,
                "created": 0,
                "model": "fake",
                "choices": [choice],
                "usage": usage,
            }

        def events():
            for piece in (summary[:10], summary[10:]):
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                yield f"data: {json.dumps({'id': 'x', 'object': kind + '.chunk', 'created': 0, 'model': 'fake', 'choices': [choice]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'id': 'x', 'object': kind + '.chunk', 'created': 0, 'model': 'fake', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    return app


@pytest.fixture(scope="session")
def draft():
    return tiny_llm("llama", 5, fast_tokenizer("a"))


@pytest.fixture(scope="session")
def upstream():
    app = fake_upstream()
    with BackgroundServer(app) as server:
        url = server.url
        yield app, url + "/v1"


@pytest.fixture(scope="session")
def proxy(upstream, draft):
    """(proxy base URL, fake upstream app): keep 0.3 of user/tool messages >= 40 tokens."""
    app, url = upstream
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    sp = SpeculativePrefill(draft, SpecPrefillConfig(keep=0.3, keep_tail=16, tolerance=0.2))
    config = ProxyConfig(url, keep=0.3, min_tokens=40)
    with BackgroundServer(create_proxy_app(config, sp)) as server:
        proxy_url = server.url
        yield proxy_url, app
    torch.set_num_threads(before)
