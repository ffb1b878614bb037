"""The FastAPI app: OpenAI chat/completions (streaming as SSE), models, health and Prometheus metrics.

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
import dataclasses
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from longserve.engine.engine import StepOutput
from longserve.engine.sequence import Sequence
from longserve.errors import ContextLengthError, InvalidParameterError, LongserveError
from longserve.kv.policies import Policy, make_policy
from longserve.llm import LLM
from longserve.server.async_engine import AsyncEngine, RequestStream
from longserve.server.errors import APIError, APIKeyMiddleware, error_body, error_response
from longserve.server.kv_plan import KVPlan, plan_kv
from longserve.server.metrics import Metrics
from longserve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    GenerationRequest,
    KVPolicySpec,
    ResponseMessage,
    Usage,
)
from longserve.server.speculative import SpeculativeEngine
from longserve.specprefill.compress import CompressedPrompt, SpeculativePrefill
from longserve.specprefill.serving import ServerPrefill, parse_option

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- what one endpoint renders ------------------------------------------------------------------


class _Format:
    """How outputs become response bodies; chat and completions differ only here."""

    prefix = ""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"{self.prefix}-{uuid.uuid4().hex}", model, int(time.time())

    def _head(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}

    def start(self) -> BaseModel | None:
        return None

    def piece(self, text: str, finish_reason: str | None) -> BaseModel:
        raise NotImplementedError

    def usage_chunk(self, usage: Usage) -> BaseModel:
        raise NotImplementedError

    def final(self, seq: Sequence, usage: Usage, stats: dict) -> BaseModel:
        raise NotImplementedError


class _ChatFormat(_Format):
    prefix = "chatcmpl"

    def start(self) -> BaseModel:
        return ChatCompletionChunk(
            **self._head(), choices=[ChatChunkChoice(delta=Delta(role="assistant", content=""))]
        )

    def piece(self, text: str, finish_reason: str | None) -> BaseModel:
        delta = Delta(content=text or None)
        return ChatCompletionChunk(
            **self._head(), choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)]
        )

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(**self._head(), choices=[], usage=usage)

    def final(self, seq: Sequence, usage: Usage, stats: dict) -> BaseModel:
        choice = ChatChoice(message=ResponseMessage(content=seq.text), finish_reason=seq.finish_reason)
        return ChatCompletion(**self._head(), choices=[choice], usage=usage, longserve=stats)


class _CompletionFormat(_Format):
    prefix = "cmpl"

    def piece(self, text: str, finish_reason: str | None) -> BaseModel:
        return Completion(**self._head(), choices=[CompletionChoice(text=text, finish_reason=finish_reason)])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return Completion(**self._head(), choices=[], usage=usage)

    def final(self, seq: Sequence, usage: Usage, stats: dict) -> BaseModel:
        choice = CompletionChoice(text=seq.text, finish_reason=seq.finish_reason)
        return Completion(**self._head(), choices=[choice], usage=usage, longserve=stats)


@dataclasses.dataclass
class PreparedPrompt:
    """The ids the target runs; with speculative prefill, their original positions and the compression."""

    ids: list[int]
    positions: list[int] | None = None
    compressed: CompressedPrompt | None = None

    @property
    def original_tokens(self) -> int:
        return self.compressed.original_tokens if self.compressed is not None else len(self.ids)


def _usage(seq: Sequence, prompt: PreparedPrompt) -> Usage:
    original = prompt.compressed.original_tokens if prompt.compressed is not None else None
    return Usage.of(seq.prompt_len, len(seq.output_ids), original)


def _stats(seq: Sequence, prompt: PreparedPrompt) -> dict:
    stats = {**seq.stats(), "e2e_s": seq.finished_at - seq.arrival}
    if prompt.compressed is not None:  # ttft_s already includes the compression (arrival predates it)
        stats["spec_prefill"] = prompt.compressed.stats()
    return stats


def _sse(data: BaseModel | dict) -> str:
    body = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {body}\n\n"


# ---- server state -------------------------------------------------------------------------------


@dataclasses.dataclass
class ServerState:
    llm: LLM
    engine: AsyncEngine
    plan: KVPlan
    default_policy: Policy
    model_id: str
    aliases: frozenset[str]
    default_max_tokens: int | None
    prefill: ServerPrefill = dataclasses.field(default_factory=lambda: ServerPrefill(None))
    spec: SpeculativeEngine | None = None  # speculative decoding (batch 1), when started with a draft

    @property
    def max_model_len(self) -> int:
        return self.plan.max_model_len

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.aliases:
            raise APIError(
                f"the model '{name}' does not exist; this server serves '{self.model_id}'",
                status_code=404,
                param="model",
                code="model_not_found",
            )

    def policy(self, spec: KVPolicySpec | None) -> Policy:
        """The server's default policy, adjusted (same name) or replaced (another name) by the request."""
        if spec is None:
            return self.default_policy
        try:
            if spec.name in (None, self.default_policy.name):
                changes = dict(spec.options)
                if spec.budget is not None or spec.ratio is not None:
                    changes.update(budget=spec.budget, ratio=spec.ratio)
                return dataclasses.replace(self.default_policy, **changes) if changes else self.default_policy
            return make_policy(spec.name, budget=spec.budget, ratio=spec.ratio, **spec.options)
        except TypeError as exc:
            raise APIError(f"bad kv_policy parameter: {exc}", param="kv_policy") from None
        except InvalidParameterError as exc:
            raise APIError(str(exc), param="kv_policy") from None

    def chat_prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        tokenizer = self.llm.tokenizer
        if getattr(tokenizer, "chat_template", None):
            try:
                return self.llm.encode(messages)
            except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:
                raise APIError(
                    f"the chat template rejected these messages: {exc}", param="messages"
                ) from None
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return list(tokenizer.encode(text, add_special_tokens=True))

    def completion_prompt_ids(self, request: CompletionRequest) -> list[int]:
        if isinstance(request.prompt, str):
            return list(self.llm.tokenizer.encode(request.prompt, add_special_tokens=True))
        vocab = self.llm.loaded.args.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(request.prompt)

    def speculative(self, request: GenerationRequest) -> bool:
        """Whether this request goes through the speculative decoder."""
        if request.speculative and self.spec is None:
            raise APIError(
                "speculative decoding was requested but this server has no draft model "
                "(start it with --draft MODEL)",
                param="speculative",
            )
        return self.spec is not None and request.speculative is not False

    def max_new_tokens(self, request: GenerationRequest, n: int) -> int:
        """max_tokens for a prompt of `n` tokens (its original length when pruned: positions go on from
        there), or `ContextLengthError`."""
        max_new = request.requested_max_tokens
        if max_new is None:
            max_new = self.max_model_len - n
            if self.default_max_tokens is not None:
                max_new = min(max_new, self.default_max_tokens)
        if n + max_new > self.max_model_len or max_new < 1:
            raise ContextLengthError(
                f"this server's maximum context length is {self.max_model_len} tokens; the prompt has {n} "
                f"tokens and max_tokens is {max_new}; shorten the prompt or lower max_tokens"
            )
        return max_new

    async def prepare(self, request: GenerationRequest, ids: list[int], prompt) -> PreparedPrompt:
        """`ids` as they are, or pruned by the prefill draft (which reads `prompt`: text, messages or ids)
        when the server has one and the request's `spec_prefill` does not turn it off."""
        self.speculative(request)  # fail fast, before any draft runs
        try:
            enabled, _ = parse_option(request.spec_prefill, self.prefill.draft_name)
        except InvalidParameterError as exc:
            raise APIError(str(exc), param="spec_prefill") from None
        if not enabled:
            return PreparedPrompt(ids)
        self.max_new_tokens(request, len(ids))  # a prompt that cannot fit is refused before the draft runs
        cp = await self.prefill.compress(self.llm, prompt, request.spec_prefill)
        if cp is None:
            return PreparedPrompt(ids)
        m = self.engine.metrics
        m.spec_prefill_requests.inc()
        m.spec_prefill_original_tokens.inc(cp.original_tokens)
        m.spec_prefill_kept_tokens.inc(len(cp.ids))
        return PreparedPrompt(list(cp.ids), cp.positions, cp)

    def submit(
        self,
        request: GenerationRequest,
        prompt: PreparedPrompt | list[int],
        request_id: str,
        arrival: float | None = None,
    ) -> RequestStream:
        """Validate everything that can be a 400 now, before any response byte is sent, then queue."""
        if not isinstance(prompt, PreparedPrompt):
            prompt = PreparedPrompt(list(prompt))
        max_new = self.max_new_tokens(request, prompt.original_tokens)
        params = request.sampling_params(max_new)
        policy = self.policy(request.kv_policy)
        # reads fixed sizes only: safe off the engine thread; bounds a speculative request's slot too
        self.engine.engine.check(len(prompt.ids), params, policy, positions=prompt.positions)
        if self.speculative(request):
            if prompt.positions is not None:  # create_app refuses the combination; never run it wrongly
                raise APIError(
                    'speculative decoding cannot run a pruned prompt; send "spec_prefill": false',
                    param="spec_prefill",
                )
            self.spec.check(len(prompt.ids), params)
            return self.spec.submit(prompt.ids, params, policy, request_id, arrival=arrival)
        return self.engine.submit(
            prompt.ids, params, policy, request_id, positions=prompt.positions, arrival=arrival
        )


# ---- HTTP plumbing ------------------------------------------------------------------------------


async def _stream_events(stream: RequestStream, fmt: _Format, include_usage: bool, prompt: PreparedPrompt):
    try:
        if (start := fmt.start()) is not None:
            yield _sse(start)
        async for out in stream:
            if out.new_text:
                yield _sse(fmt.piece(out.new_text, None))
            if out.finished:
                yield _sse(fmt.piece("", out.seq.finish_reason))
                if include_usage:
                    yield _sse(fmt.usage_chunk(_usage(out.seq, prompt)))
    except LongserveError as exc:  # headers are gone: report in-band, as OpenAI does
        yield _sse(error_body(exc))
    finally:
        stream.close()
    yield "data: [DONE]\n\n"


async def _collect(stream: RequestStream, request: Request) -> StepOutput | None:
    """The final output, or None if the client went away (then the request is aborted)."""

    async def close_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stream.close()

    watcher = asyncio.create_task(close_on_disconnect())
    last = None
    try:
        async for out in stream:
            last = out
    finally:
        watcher.cancel()
        stream.close()
    return last if last is not None and last.finished else None


async def _respond(
    state: ServerState,
    request: Request,
    body: GenerationRequest,
    prompt: PreparedPrompt,
    fmt: _Format,
    arrival: float,
) -> Response:
    stream = state.submit(body, prompt, fmt.id, arrival)
    if body.stream:
        events = _stream_events(stream, fmt, body.include_usage, prompt)
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers=_SSE_HEADERS,
            background=BackgroundTask(stream.close),
        )
    last = await _collect(stream, request)
    if last is None:
        return JSONResponse(
            {
                "error": {
                    "message": "client disconnected",
                    "type": "client_closed",
                    "param": None,
                    "code": None,
                }
            },
            status_code=499,
        )
    return JSONResponse(fmt.final(last.seq, _usage(last.seq, prompt), _stats(last.seq, prompt)).model_dump())


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
) -> FastAPI:
    """An app serving `llm` (a `longserve.LLM`).

    `kv_policy`: the server-wide default (else the LLM's); requests may pick another with the
    `kv_policy` body field if it fits a slot. `max_kv_memory` (bytes or "4GiB" / "65536tok") and
    `max_batch_size` size the slot pool (see `kv_plan`); `max_waiting` bounds the queue (429 beyond);
    `default_max_tokens` caps generation when a request gives no max_tokens (else: up to max_model_len).
    `spec_prefill`: a `SpeculativePrefill` whose draft prunes prompts (per request: the `spec_prefill`
    body field). `speculative`: a `longserve.spec.SpeculativeDecoder` (default: `llm.speculative`, set by
    `LLM(..., draft=...)`); requests then run through it one at a time (batch 1) unless they send
    `"speculative": false`.
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
    shared_metrics = Metrics()
    engine = AsyncEngine(
        llm.engine(plan.n_slots, plan.slot_capacity), max_waiting=max_waiting, metrics=shared_metrics
    )
    spec = (
        SpeculativeEngine(speculative, max_waiting=max_waiting, metrics=shared_metrics)
        if speculative
        else None
    )
    workers = [engine] + ([spec] if spec is not None else [])
    name = llm.loaded.name
    model_id = served_model_name or name
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
    app.state.server = state
    app.add_exception_handler(LongserveError, lambda _, exc: error_response(exc))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    v1 = APIRouter(prefix="/v1")

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        state.check_model(body.model)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        prompt = await state.prepare(body, state.chat_prompt_ids(body), messages)
        return await _respond(state, request, body, prompt, _ChatFormat(model_id), arrival)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        state.check_model(body.model)
        ids = state.completion_prompt_ids(body)
        # text goes to the draft as text (any draft tokenizer works), token ids as ids (same tokenizer only)
        prompt = await state.prepare(body, ids, body.prompt if isinstance(body.prompt, str) else ids)
        return await _respond(state, request, body, prompt, _CompletionFormat(model_id), arrival)

    @v1.get("/models")
    async def models() -> dict:
        card = {
            "id": model_id,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "longserve",
            "root": str(name),
            "max_model_len": plan.max_model_len,
            "longserve": {"kv": plan.as_dict(), **features},
        }
        return {"object": "list", "data": [card]}

    app.include_router(v1)

    @app.get("/health")
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

    @app.get("/metrics")
    async def metrics() -> Response:
        content, content_type = shared_metrics.render()
        return Response(content, media_type=content_type)

    return app
