"""Refuse oversized request bodies before anything reads them (413, OpenAI error JSON).

A 10 MB body used to be parsed and tokenized on the event loop: every stream stalled and `/health`
answered after 13 s. This ASGI middleware checks `Content-Length` at once and counts the bytes of a
chunked body as they arrive, so the server never holds more than `max_bytes` of one request.
"""

from __future__ import annotations

import json

from longserve.server.errors import APIError, error_body

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


class BodyTooLarge(APIError):
    def __init__(self, max_bytes: int):
        super().__init__(
            f"the request body exceeds the server's limit of {max_bytes} bytes (--max-request-bytes)",
            status_code=413,
            error_type="invalid_request_error",
            code="request_too_large",
        )


class BodyLimit:
    """ASGI middleware: `app = BodyLimit(app, max_bytes)`."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen, started = 0, False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # the app's LongserveError handler answers 413 itself
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(BodyTooLarge(self.max_bytes))).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
