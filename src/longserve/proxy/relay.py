"""The response side of the proxy: what a request's compression did (`CompressionPlan`) and how upstream
responses, streams and errors are relayed with it (headers, extra `usage` fields, in-band stream errors).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi.responses import JSONResponse

from longserve.specprefill.compress import CompressedPrompt

HEADER = "x-longserve-prompt-tokens"
_RESPONSE_DROP = {"content-length", "connection", "keep-alive", "transfer-encoding", "content-encoding"}


@dataclass
class CompressionPlan:
    """What one request's compression did (None fields: nothing was compressed)."""

    original: int | None = None
    compressed: int | None = None
    cp: CompressedPrompt | None = None

    def headers(self) -> dict[str, str]:
        if self.original is None:
            return {}
        out = {HEADER: f"{self.original}/{self.compressed}"}
        if self.cp is not None:
            out["x-longserve-compress-ms"] = f"{self.cp.compress_s * 1000:.0f}"
        return out

    def usage_fields(self) -> dict[str, Any]:
        if self.original is None:
            return {}
        return {"original_prompt_tokens": self.original, "compressed_prompt_tokens": self.compressed}


async def upstream_error(resp: httpx.Response) -> JSONResponse:
    """The upstream's error with its status; a non-OpenAI body is wrapped into an OpenAI error."""
    raw = await resp.aread()
    await resp.aclose()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict | str)):
        text = raw.decode(errors="replace").strip()[:1000]
        body = {
            "error": {
                "message": f"upstream returned HTTP {resp.status_code}: {text or resp.reason_phrase}",
                "type": "upstream_error",
                "param": None,
                "code": resp.status_code,
            }
        }
    return JSONResponse(body, status_code=resp.status_code)


def add_usage(obj: Any, plan: CompressionPlan) -> bool:
    """Add our token counts to a response's `usage`, when it has one and something was compressed."""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if isinstance(usage, dict) and plan.original is not None:
        usage.update(plan.usage_fields())
        return True
    return False


async def relay_sse(resp: httpx.Response, plan: CompressionPlan) -> AsyncIterator[str]:
    """Forward the upstream's event stream line by line, adding our fields to the usage chunk."""
    try:
        async for line in resp.aiter_lines():
            if plan.original is not None and line.startswith("data:") and '"usage"' in line:
                try:
                    obj = json.loads(line[5:])
                    if add_usage(obj, plan):
                        line = "data: " + json.dumps(obj, ensure_ascii=False)
                except ValueError:
                    pass
            yield line + "\n"
    except httpx.HTTPError as exc:  # headers are gone: report in-band, as OpenAI does
        error = {
            "error": {
                "message": f"the upstream stream broke: {type(exc).__name__}: {exc}",
                "type": "upstream_error",
                "param": None,
                "code": "upstream_stream_error",
            }
        }
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"


def response_headers(resp: httpx.Response, plan: CompressionPlan) -> dict[str, str]:
    """The upstream's headers minus hop-by-hop/length ones (we re-encode), plus the plan's."""
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in _RESPONSE_DROP}
    headers.update(plan.headers())
    return headers
