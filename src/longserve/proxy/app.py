"""A compressing OpenAI-compatible proxy: speculative prefill in front of any engine (llama.cpp, vLLM, ...).

Long message contents (chosen roles, above `min_tokens`) are pruned by a small local draft model before
the request is forwarded, so the upstream prefills a fraction of the prompt; the chat template, short
messages and each prompt's last `keep_tail` tokens pass verbatim. Everything else is forwarded untouched
(unknown fields, tools, other endpoints); streams are relayed line by line as they arrive.

Sizes are reported in a `x-longserve-prompt-tokens: original/compressed` header and, when the upstream
returns usage, as extra `usage` fields (`original_prompt_tokens`, `compressed_prompt_tokens`). Counts use
`target_tokenizer` (the upstream model's tokenizer, when known) or else the draft's. Per request, an extra
body field `"spec_prefill": {"keep": 0.1, "min_tokens": 512, "roles": ["user"]}` (or `false`) overrides
the defaults; it is removed before forwarding.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from longserve.errors import InvalidParameterError, LongserveError
from longserve.proxy.relay import (
    HEADER,
    CompressionPlan,
    add_usage,
    relay_sse,
    response_headers,
    upstream_error,
)
from longserve.server.errors import APIError, APIKeyMiddleware, error_response
from longserve.specprefill import prompt as P
from longserve.specprefill.compress import SpeculativePrefill

__all__ = ["HEADER", "Proxy", "ProxyConfig", "ProxyError", "create_proxy_app"]

_HOP = {
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "trailer",
    "accept-encoding",
    "authorization",
}


@dataclass(frozen=True)
class ProxyConfig:
    """`upstream`: the upstream's base URL (`http://host:port/v1`). `keep`, `min_tokens` (content tokens
    below which a message is left alone) and `roles` are per-request defaults. `api_key`: required from
    clients (else the client's Authorization header is forwarded); `upstream_api_key`: sent upstream."""

    upstream: str
    keep: float = 0.25
    min_tokens: int = 1024
    roles: tuple[str, ...] = ("user", "tool")
    api_key: str | None = None
    upstream_api_key: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        base = self.upstream.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise InvalidParameterError(f"--upstream must be an http(s) URL, got {self.upstream!r}")
        object.__setattr__(self, "upstream", base if base.endswith("/v1") else base + "/v1")
        if not (0 < self.keep <= 1):
            raise InvalidParameterError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.min_tokens < 0:
            raise InvalidParameterError(f"min_tokens must be >= 0, got {self.min_tokens}")


class ProxyError(APIError):
    def __init__(
        self,
        message: str,
        status_code: int = 400,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message, status_code=status_code, error_type=error_type, code=code, param=param)


class Proxy:
    """State shared by the routes: the compressor, the upstream client, a lock (one draft run at a time)."""

    def __init__(
        self,
        config: ProxyConfig,
        compressor: SpeculativePrefill | None,
        target_tokenizer=None,
        client: httpx.AsyncClient | None = None,
    ):
        self.config, self.sp = config, compressor
        self.tokenizer = target_tokenizer or (compressor.draft.tokenizer if compressor else None)
        self.client = client
        self.lock = asyncio.Lock()

    # ---- compression ---------------------------------------------------------------------------
    def options(self, body: dict) -> tuple[bool, float, int, tuple[str, ...]]:
        raw = body.pop("spec_prefill", None)
        cfg = self.config
        if raw is False or (isinstance(raw, dict) and raw.get("enabled") is False):
            return False, cfg.keep, cfg.min_tokens, cfg.roles
        if raw not in (None, True) and not isinstance(raw, dict):
            raise ProxyError(
                'spec_prefill must be an object like {"keep": 0.25} or false', param="spec_prefill"
            )
        raw = raw if isinstance(raw, dict) else {}
        keep = raw.get("keep", cfg.keep)
        if isinstance(keep, bool) or not isinstance(keep, int | float) or not (0 < keep <= 1):
            raise ProxyError(f"spec_prefill.keep must be in (0, 1], got {keep!r}", param="spec_prefill.keep")
        min_tokens = raw.get("min_tokens", cfg.min_tokens)
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise ProxyError(
                "spec_prefill.min_tokens must be an integer >= 0", param="spec_prefill.min_tokens"
            )
        roles = raw.get("roles", cfg.roles)
        if isinstance(roles, str):
            roles = [roles]
        if not isinstance(roles, list | tuple) or not all(isinstance(r, str) for r in roles):
            raise ProxyError("spec_prefill.roles must be a list of role names", param="spec_prefill.roles")
        return self.sp is not None, float(keep), min_tokens, tuple(roles)

    def _long_enough(self, text: str, min_tokens: int) -> bool:
        if len(text) < min_tokens:  # a token covers at least one character: cheap early exit
            return False
        return P.content_tokens(self.tokenizer, [text]) >= min_tokens

    def compress_chat(self, body: dict) -> CompressionPlan:
        enabled, keep, min_tokens, roles = self.options(body)
        messages = body.get("messages")
        if not enabled or not isinstance(messages, list) or not messages:
            return CompressionPlan()
        texts = [P.message_text(m.get("content")) if isinstance(m, dict) else None for m in messages]
        if any(t is None for t in texts) or any(not isinstance(m.get("role"), str) for m in messages):
            return CompressionPlan()  # images, malformed messages: the upstream decides
        chosen = [
            i
            for i, (m, t) in enumerate(zip(messages, texts, strict=True))
            if m["role"] in roles and self._long_enough(t, min_tokens)
        ]
        plain = [{"role": m["role"], "content": t} for m, t in zip(messages, texts, strict=True)]
        if not chosen:
            n = P.count_tokens(self.tokenizer, plain)
            return CompressionPlan(n, n)
        cp = self.sp.compress_text(plain, self.tokenizer, keep=keep, compress=chosen)
        if cp.path != "passthrough":
            for i in chosen:
                messages[i] = {**messages[i], "content": cp.prompt[i]["content"]}
        return CompressionPlan(cp.original_tokens, cp.kept_tokens, cp)

    def compress_completion(self, body: dict) -> CompressionPlan:
        enabled, keep, min_tokens, _ = self.options(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not enabled or not isinstance(prompt, str) or not prompt:
            return CompressionPlan()
        if not self._long_enough(prompt, min_tokens):
            n = P.count_tokens(self.tokenizer, prompt)
            return CompressionPlan(n, n)
        cp = self.sp.compress_text(prompt, self.tokenizer, keep=keep)
        body["prompt"] = cp.prompt
        return CompressionPlan(cp.original_tokens, cp.kept_tokens, cp)

    async def plan(self, body: dict, chat: bool) -> CompressionPlan:
        run = self.compress_chat if chat else self.compress_completion
        async with self.lock:  # the draft is CPU-bound: one at a time, off the event loop
            try:
                return await asyncio.to_thread(run, body)
            except InvalidParameterError as exc:
                raise ProxyError(str(exc)) from None

    # ---- forwarding ----------------------------------------------------------------------------
    def upstream_headers(self, request: Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        if self.config.upstream_api_key:
            headers["authorization"] = f"Bearer {self.config.upstream_api_key}"
        elif not self.config.api_key and "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        return headers

    async def send(
        self,
        method: str,
        path: str,
        request: Request,
        *,
        json_body: dict | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        url = f"{self.config.upstream}/{path.lstrip('/')}"
        req = self.client.build_request(
            method,
            url,
            headers=self.upstream_headers(request),
            json=json_body,
            content=content,
            params=request.query_params,
        )
        try:
            return await self.client.send(req, stream=True)
        except httpx.TimeoutException as exc:
            raise ProxyError(
                f"the upstream {self.config.upstream} timed out ({type(exc).__name__})",
                status_code=504,
                error_type="api_error",
                code="upstream_timeout",
            ) from None
        except httpx.RequestError as exc:
            raise ProxyError(
                f"the upstream {self.config.upstream} is unreachable ({type(exc).__name__}: {exc}); "
                "check that it is running and that --upstream is right",
                status_code=502,
                error_type="api_error",
                code="upstream_unreachable",
            ) from None


def create_proxy_app(
    config: ProxyConfig,
    compressor: SpeculativePrefill | None,
    *,
    target_tokenizer=None,
    client: httpx.AsyncClient | None = None,
) -> FastAPI:
    """The proxy app. `compressor=None` forwards everything unchanged (a baseline for benchmarks)."""
    proxy = Proxy(config, compressor, target_tokenizer, client)

    async def lifespan(_: FastAPI):
        own = proxy.client is None
        if own:
            proxy.client = httpx.AsyncClient(timeout=httpx.Timeout(config.timeout_s, connect=10.0))
        try:
            yield
        finally:
            if own:
                await proxy.client.aclose()

    app = FastAPI(title="longserve proxy", lifespan=lifespan)
    app.state.proxy = proxy
    app.add_exception_handler(LongserveError, lambda _, exc: error_response(exc))
    app.add_exception_handler(
        Exception,
        lambda _, exc: error_response(
            ProxyError(
                f"proxy error: {type(exc).__name__}: {exc}", status_code=500, error_type="server_error"
            )
        ),
    )
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)

    async def generation(request: Request, path: str, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise ProxyError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ProxyError("the request body must be a JSON object")
        start = time.perf_counter()
        plan = await proxy.plan(body, chat)
        resp = await proxy.send("POST", path, request, json_body=body)
        if resp.status_code >= 400:
            return await upstream_error(resp)
        headers = response_headers(resp, plan)
        headers["x-longserve-proxy-ms"] = f"{(time.perf_counter() - start) * 1000:.0f}"
        if "text/event-stream" in resp.headers.get("content-type", ""):
            return StreamingResponse(
                relay_sse(resp, plan),
                status_code=resp.status_code,
                headers=headers,
                media_type="text/event-stream",
                background=BackgroundTask(resp.aclose),
            )
        raw = await resp.aread()
        await resp.aclose()
        try:
            data = json.loads(raw)
        except ValueError:
            return Response(raw, status_code=resp.status_code, headers=headers)
        add_usage(data, plan)
        headers.pop("content-type", None)
        return JSONResponse(data, status_code=resp.status_code, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generation(request, "chat/completions", chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generation(request, "completions", chat=False)

    @app.get("/health")
    async def health() -> JSONResponse:
        draft = compressor.draft.loaded.name if compressor else None
        return JSONResponse(
            {"status": "ok", "upstream": config.upstream, "draft": draft, "keep": config.keep}
        )

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def passthrough(path: str, request: Request) -> Response:
        resp = await proxy.send(request.method, path, request, content=await request.body())
        if resp.status_code >= 400:
            return await upstream_error(resp)
        return StreamingResponse(
            resp.aiter_bytes(),
            status_code=resp.status_code,
            headers=response_headers(resp, CompressionPlan()),
            background=BackgroundTask(resp.aclose),
        )

    return app
