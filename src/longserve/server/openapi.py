"""The OpenAPI document made to match what the server really sends, so generated clients and contract
fuzzers (schemathesis) can trust it: every error is a 400/401/404/413/429/500/503 with the OpenAI error
body (never FastAPI's 422: `_validation_error` turns those into 400), chat/completions answer JSON or an
SSE stream, `/metrics` is Prometheus text, and the model objects are described.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, used for every non-2xx answer."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    max_model_len: int
    longserve: dict[str, Any]  # the KV plan and the speculative features


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_WHY = {
    400: "invalid request (a parameter out of range, a prompt too long, malformed JSON); `param` names it",
    401: "missing or wrong API key (only when the server was started with one)",
    404: "unknown model",
    413: "request body over --max-request-bytes",
    429: "the waiting queue is full; Retry-After estimates when a slot frees",
    500: "generation failed (logged with its traceback)",
    503: "the engine is not running",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that may answer these error statuses."""
    return {code: {"model": ErrorResponse, "description": _WHY[code]} for code in codes}


def generation_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A generation route: `model` as JSON, or (`"stream": true`) server-sent events; and its errors."""
    event = {
        "type": "object",
        "properties": {"data": {"type": "string", "description": "one chunk as JSON; the last is [DONE]"}},
        "required": ["data"],
    }
    sse = {"text/event-stream": {"schema": event}}
    return {
        200: {"model": model, "description": "the completion, or an SSE stream of chunks", "content": sse},
        **errors(400, 401, 404, 413, 429, 500, 503),
    }


TEXT_RESPONSE = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


REQUESTS = ("ChatCompletionRequest", "CompletionRequest")


def _bound_ints(node: Any, low: int, high: int) -> None:
    """Every integer in a (sub)schema limited to [low, high] (token ids: the vocabulary)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node.update(minimum=low, maximum=high)
        for child in node.values():
            _bound_ints(child, low, high)
    elif isinstance(node, list):
        for child in node:
            _bound_ints(child, low, high)


def match_behaviour(
    app: FastAPI, *, vocab_size: int, max_model_len: int, speculative: bool, spec_prefill: bool
) -> None:
    """Build the schema without FastAPI's 422 responses and validation-error components (the server
    answers invalid bodies with 400 and the OpenAI error body, which each route documents), and with this
    server's own limits: token ids in the vocabulary, max_tokens below max_model_len, `speculative` /
    `spec_prefill` only as far as the server has the draft they need."""

    def narrow(props: dict[str, Any]) -> None:
        for name in ("max_tokens", "max_completion_tokens"):
            if name in props:
                props[name]["anyOf"][0]["maximum"] = max_model_len - 1
        if "prompt" in props:
            _bound_ints(props["prompt"], 0, vocab_size - 1)
        if not speculative:
            props["speculative"] = {"enum": [False, None], "description": "this server has no --draft"}
        if not spec_prefill:
            props["spec_prefill"] = {
                "anyOf": [{"type": "boolean"}, {"type": "null"}, {**_NO_PREFILL, "required": ["enabled"]}],
                "description": "this server has no --prefill-draft: only false / {'enabled': false} turn it off",
            }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for name in REQUESTS:
                narrow(components[name]["properties"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


_NO_PREFILL = {"type": "object", "properties": {"enabled": {"const": False}}, "additionalProperties": False}
