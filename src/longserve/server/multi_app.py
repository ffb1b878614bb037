"""The app of a several-model server (`longserve serve --model a --model b`, `--models experts.toml`).

The same OpenAI routes as the one-model app (`api_server`), each request first leasing its expert from
the `ModelRegistry` (switching it in if needed) and then answered by that expert's own `ServerState`
exactly as a one-model server answers. The response's `model` is the expert that answered; headers
`x-longserve-expert` and `x-longserve-switch-seconds` (the time this request waited for its expert to
be made resident) come with every answer, streams included: their headers go out after the switch,
before the first chunk.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from longserve.server.api_server import install_error_handling
from longserve.server.limits import DEFAULT_MAX_REQUEST_BYTES
from longserve.server.openapi import (
    TEXT_RESPONSE,
    ModelCard,
    ModelList,
    errors,
    generation_responses,
    match_behaviour,
)
from longserve.server.protocol import ChatCompletionRequest, CompletionRequest
from longserve.server.registry import ModelRegistry
from longserve.server.responses import ChatCompletion, Completion
from longserve.server.routing import Lease
from longserve.server.serving import ChatFormat, CompletionFormat, respond


def _client_gone() -> JSONResponse:
    body = {"error": {"message": "client disconnected", "type": "client_closed", "param": None, "code": None}}
    return JSONResponse(body, status_code=499)


def _hand_over(response: Response, lease: Lease) -> Response:
    """Name the expert in the headers; release the lease when the answer is complete (a stream: once it
    ends or its client goes away, whichever path closes it first)."""
    response.headers["x-longserve-expert"] = lease.expert
    response.headers["x-longserve-switch-seconds"] = f"{lease.switch_s:.6f}"
    if not isinstance(response, StreamingResponse):
        lease.release()
        return response
    body, background = response.body_iterator, response.background

    async def events():
        try:
            async for event in body:
                yield event
        finally:
            try:
                await body.aclose()  # closes the request's stream (aborts it if unfinished) first
            finally:
                lease.release()

    async def after() -> None:
        try:
            if background is not None:
                await background()
        finally:
            lease.release()

    response.body_iterator, response.background = events(), BackgroundTask(after)
    return response


def _chat_text(body: ChatCompletionRequest) -> str:
    return "\n".join(str(m.content or "") for m in body.messages)


def create_multi_app(
    registry: ModelRegistry,
    *,
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """An app serving every expert of `registry` (started here if it was not: that loads and measures
    every expert, and refuses one that does not fit the weight budget)."""
    if not registry.started:
        registry.start()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        yield
        await asyncio.to_thread(registry.shutdown)

    app = FastAPI(title="longserve", lifespan=lifespan)
    profiles, plans = registry.profiles.values(), registry.plans.values()
    match_behaviour(
        app,
        vocab_size=min(p.vocab_size for p in profiles),
        max_model_len=max(p.max_model_len for p in plans),
        speculative=False,
        spec_prefill=False,
    )
    app.state.registry = registry
    install_error_handling(app, api_key, max_request_bytes)
    v1 = APIRouter(prefix="/v1")

    @v1.post("/chat/completions", responses=generation_responses(ChatCompletion))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()  # TTFT includes the switch
        lease = await registry.acquire(body.model, lambda: _chat_text(body), request)
        if lease is None:
            return _client_gone()
        try:
            state = lease.state
            ids = await asyncio.to_thread(state.chat_prompt_ids, body)
            prompt = await state.prepare(body, ids, state.messages(body))
            response = await respond(state, request, body, prompt, ChatFormat(lease.expert), arrival)
        except BaseException:
            lease.release()
            raise
        return _hand_over(response, lease)

    @v1.post("/completions", responses=generation_responses(Completion))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        text = body.prompt if isinstance(body.prompt, str) else None
        lease = await registry.acquire(body.model, lambda: text, request)
        if lease is None:
            return _client_gone()
        try:
            state = lease.state
            ids = await asyncio.to_thread(state.completion_prompt_ids, body)
            prompt = await state.prepare(body, ids, body.prompt if isinstance(body.prompt, str) else ids)
            response = await respond(state, request, body, prompt, CompletionFormat(lease.expert), arrival)
        except BaseException:
            lease.release()
            raise
        return _hand_over(response, lease)

    def card(name: str) -> ModelCard:
        expert, plan, profile = registry.experts[name], registry.plans[name], registry.profiles[name]
        return ModelCard(
            id=name,
            created=int(time.time()),
            owned_by="longserve",
            root=expert.model,
            max_model_len=plan.max_model_len,
            longserve={
                "tier": registry.tier(name),
                "pinned": expert.pinned,
                "weight_bytes": profile.size,
                "description": expert.description,
                "kv": plan.as_dict(),
            },
        )

    @v1.get("/models", responses=errors(401))
    async def models() -> ModelList:
        return ModelList(data=[card(name) for name in registry.experts])

    @v1.get("/models/{model:path}", responses=errors(401, 404))
    async def model(model: str) -> ModelCard:
        """One expert (OpenAI's retrieve) by name or alias; else 404."""
        return card(registry.resolve(model))

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Answers during a switch: switches run off the event loop."""
        experts = {}
        for name in registry.experts:
            resident = registry.residents.get(name)
            info = resident.load_info() if resident is not None else {"running": 0, "waiting": 0}
            experts[name] = {
                "tier": registry.tier(name),
                **info,
                "waiting_for_switch": registry.waiting[name],
            }
        body = {
            "status": "ok",
            "models": experts,
            "resident": list(registry.residents),
            "default_model": registry.default_model,
        }
        return JSONResponse(body)

    @app.get("/metrics", response_class=PlainTextResponse, responses=TEXT_RESPONSE)
    async def metrics() -> Response:
        registry.coe_metrics.refresh(registry)
        content, content_type = registry.coe_metrics.render()
        return Response(content, media_type=content_type)

    return app
