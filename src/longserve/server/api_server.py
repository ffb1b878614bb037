"""The FastAPI app (vLLM's `api_server`: app factory, routes, auth, startup): OpenAI chat/completions
(streaming as SSE), models, health and Prometheus metrics.

Chat messages go through the tokenizer's chat template when it has one; otherwise they are joined as
`role: content` lines followed by `assistant: ` so template-less (base) models still answer chats.
`/v1/*` needs the API key when one is set; `/health` and `/metrics` stay open for probes and scrapers
(the server binds 127.0.0.1 unless told otherwise).

Speculative prefill (`spec_prefill=`, `--prefill-draft`): a small draft prunes each prompt before the
target prefills it; the kept tokens keep their original position ids, so requests still join the
continuous batch. Speculative decoding (`speculative=`, `--draft`): requests run through a
`SpeculativeDecoder` one at a time on their own thread (batch 1, see `server.speculative`) unless they
send `"speculative": false`. The two cannot be combined yet (the decoder takes no position ids).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from longserve.errors import InvalidParameterError, LongserveError
from longserve.kv.policies import Policy
from longserve.server.async_engine import AsyncEngine
from longserve.server.errors import APIError, APIKeyMiddleware, error_response
from longserve.server.kv_plan import plan_kv
from longserve.server.limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimit
from longserve.server.metrics import Metrics
from longserve.server.openapi import (
    TEXT_RESPONSE,
    ModelCard,
    ModelList,
    errors,
    generation_responses,
    match_behaviour,
)
from longserve.server.protocol import ChatCompletionRequest, CompletionRequest
from longserve.server.responses import ChatCompletion, Completion
from longserve.server.serving import ChatFormat, CompletionFormat, respond
from longserve.server.serving_engine import ServerState
from longserve.server.speculative import SpeculativeEngine
from longserve.specprefill.compress import SpeculativePrefill
from longserve.specprefill.serving import ServerPrefill

DEFAULT_MAX_STEP_TOKENS = 512  # a prefill step while others decode: ~1-2 s of stall on 2 cores at 4k


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(APIError("the request body is not valid JSON"))
    parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors[:3]]
    loc = [str(x) for x in errors[0]["loc"][1:2]] if errors else []
    return error_response(APIError("invalid request: " + "; ".join(parts), param=loc[0] if loc else None))


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = APIError(str(exc.detail), status_code=exc.status_code, headers=exc.headers)
    return error_response(error)


def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(
        APIError(f"internal error: {type(exc).__name__}: {exc}", status_code=500, error_type="server_error")
    )


def install_error_handling(app: FastAPI, api_key: str | None, max_request_bytes: int) -> None:
    """Every failure as the OpenAI error body, the API key on /v1, the body size limit: the same for a
    one-model and a several-model app."""
    app.add_exception_handler(LongserveError, lambda _, exc: error_response(exc))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)


def create_app(
    llm,
    *,
    served_model_name: str | None = None,
    kv_policy: Policy | None = None,
    max_model_len: int | None = None,
    max_batch_size: int | None = None,
    max_kv_memory: str | int | None = None,
    max_waiting: int | None = None,
    default_max_tokens: int | None = None,
    api_key: str | None = None,
    spec_prefill: SpeculativePrefill | None = None,
    speculative=None,
    max_step_tokens: int | None = DEFAULT_MAX_STEP_TOKENS,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """An app serving `llm` (a `longserve.LLM`).

    `kv_policy`: the server-wide default (else the LLM's); requests may pick another with the
    `kv_policy` body field if it fits a slot. `max_kv_memory` (bytes or "4GiB" / "65536tok") and
    `max_batch_size` size the slot pool (see `kv_plan`); `max_waiting` bounds the queue (429 beyond);
    `default_max_tokens` caps generation when a request gives no max_tokens (else: up to max_model_len).
    `spec_prefill`: a `SpeculativePrefill` whose draft prunes prompts (per request: the `spec_prefill`
    body field). `speculative`: a `longserve.spec.SpeculativeDecoder` (default: `llm.speculative`, set by
    `LLM(..., draft=...)`); requests then run through it one at a time (batch 1) unless they send
    `"speculative": false`. `max_step_tokens`: prompt tokens a prefill step may run while other
    requests decode (bounds their inter-token stalls; None = a whole --prefill-chunk). Request bodies
    over `max_request_bytes` are refused with 413 before they are read. The LLM's prefix cache
    (`LLM(..., prefix_cache=...)`, `--prefix-cache-memory`) serves every request under `full`.
    """
    if speculative is None:
        speculative = getattr(llm, "speculative", None)
    if speculative is not None and speculative.target is not llm:
        raise InvalidParameterError("the speculative decoder's target is not the served LLM")
    if speculative is not None and spec_prefill is not None:
        raise InvalidParameterError(
            "speculative prefill (--prefill-draft) and speculative decoding (--draft) "
            "cannot be combined yet: the speculative decoder takes no position ids"
        )
    policy = kv_policy if kv_policy is not None else llm.policy()
    plan = plan_kv(
        llm, policy, max_model_len=max_model_len, max_batch_size=max_batch_size, max_kv_memory=max_kv_memory
    )
    name = llm.loaded.name
    model_id = served_model_name or name
    shared_metrics = Metrics(model_name=model_id)
    if llm.prefix_cache is not None:
        shared_metrics.watch_prefix_cache(llm.prefix_cache)
    engine = AsyncEngine(
        llm.engine(plan.n_slots, plan.slot_capacity, max_step_tokens=max_step_tokens),
        max_waiting=max_waiting,
        metrics=shared_metrics,
    )
    spec = (
        SpeculativeEngine(speculative, max_waiting=max_waiting, metrics=shared_metrics)
        if speculative
        else None
    )
    workers = [engine] + ([spec] if spec is not None else [])
    state = ServerState(
        llm,
        engine,
        plan,
        policy,
        model_id,
        frozenset({model_id, name, Path(str(name)).name}),
        default_max_tokens,
        ServerPrefill(spec_prefill),
        spec,
    )
    features = {
        "speculative": spec.describe() if spec is not None else None,
        "spec_prefill": (
            {
                "draft": state.prefill.draft_name,
                "keep": spec_prefill.config.keep,
                "keep_tail": spec_prefill.config.keep_tail,
            }
            if spec_prefill is not None
            else None
        ),
    }

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        for worker in workers:
            worker.start()
        yield
        for worker in workers:
            await asyncio.to_thread(worker.shutdown)

    app = FastAPI(title="longserve", lifespan=lifespan)
    match_behaviour(
        app,
        vocab_size=llm.loaded.args.vocab_size,
        max_model_len=plan.max_model_len,
        speculative=spec is not None,
        spec_prefill=spec_prefill is not None,
    )
    app.state.server = state
    install_error_handling(app, api_key, max_request_bytes)

    v1 = APIRouter(prefix="/v1")

    @v1.post("/chat/completions", responses=generation_responses(ChatCompletion))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        state.check_model(body.model)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        ids = await asyncio.to_thread(state.chat_prompt_ids, body)  # a long prompt must not block the loop
        prompt = await state.prepare(body, ids, messages)
        return await respond(state, request, body, prompt, ChatFormat(model_id), arrival)

    @v1.post("/completions", responses=generation_responses(Completion))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        state.check_model(body.model)
        ids = await asyncio.to_thread(state.completion_prompt_ids, body)
        # text goes to the draft as text (any draft tokenizer works), token ids as ids (same tokenizer only)
        prompt = await state.prepare(body, ids, body.prompt if isinstance(body.prompt, str) else ids)
        return await respond(state, request, body, prompt, CompletionFormat(model_id), arrival)

    def card() -> ModelCard:
        return ModelCard(
            id=model_id,
            created=int(time.time()),
            owned_by="longserve",
            root=str(name),
            max_model_len=plan.max_model_len,
            longserve={"kv": plan.as_dict(), **features},
        )

    @v1.get("/models", responses=errors(401))
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @v1.get("/models/{model:path}", responses=errors(401, 404))
    async def model(model: str) -> ModelCard:
        """One model object (OpenAI's retrieve): the served id or one of its aliases; else 404."""
        state.check_model(model)
        return card()

    app.include_router(v1)

    @app.get("/health", responses={503: {"description": "the engine is not running (same body)"}})
    async def health() -> JSONResponse:
        pool = engine.engine.pool
        ok = all(worker.is_alive for worker in workers)
        running, waiting = len(engine.engine.scheduler.running), engine.num_waiting
        if spec is not None:
            running, waiting = running + spec.num_running, waiting + spec.num_waiting
        body = {
            "status": "ok" if ok else "engine not running",
            "model": model_id,
            "kv": plan.as_dict(),
            "running": running,
            "waiting": waiting,
            "free_slots": pool.n_free,
            **features,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=TEXT_RESPONSE)
    async def metrics() -> Response:
        content, content_type = shared_metrics.render()
        return Response(content, media_type=content_type)

    return app
