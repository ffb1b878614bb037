"""HTTP-only errors and the OpenAI error body every failure is rendered as.

Engine errors (`LongserveError`) already carry `status_code` and `error_type`; these add the cases
that only exist behind HTTP (auth, queueing, routing) so one handler renders them all.
"""

from __future__ import annotations

import hmac
import json

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from longserve.errors import ContextLengthError, LongserveError


class APIError(LongserveError):
    """An error with an explicit HTTP status, OpenAI `type`, `param` and `code`."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code, self.error_type, self.param, self.code = status_code, error_type, param, code
        self.headers = headers or {}


class QueueFullError(APIError):
    """Too many requests wait for a KV slot; clients should back off (429 + Retry-After)."""

    def __init__(self, waiting: int, retry_after_s: int = 1):
        super().__init__(
            f"the server is at capacity ({waiting} requests already wait for a KV slot); retry later",
            status_code=429,
            error_type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after_s)},
        )


class RequestFailedError(APIError):
    """An unexpected exception while generating one request; only that request fails."""

    def __init__(self, exc: BaseException):
        super().__init__(
            f"generation failed: {type(exc).__name__}: {exc}",
            status_code=500,
            error_type="server_error",
            code="internal_error",
        )


def error_body(exc: LongserveError) -> dict:
    """`{"error": {"message", "type", "param", "code"}}` as the OpenAI API returns it."""
    code = getattr(exc, "code", None)
    if code is None and isinstance(exc, ContextLengthError):
        code = "context_length_exceeded"
    return {
        "error": {
            "message": str(exc),
            "type": exc.error_type,
            "param": getattr(exc, "param", None),
            "code": code,
        }
    }


class ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error may quote the client's input, and a string holding half a
    UTF-16 surrogate pair (legal in JSON escapes) cannot be encoded as UTF-8 (the handler crashed)."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_response(exc: LongserveError) -> JSONResponse:
    return ASCIIJSONResponse(
        error_body(exc), status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


class APIKeyMiddleware:
    """Checks `Authorization: Bearer KEY` on /v1 before the body is read (pure ASGI: streams untouched).
    Shared by the server and the proxy."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                error = APIError(
                    "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    status_code=401,
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
