"""Rendering responses per endpoint (chat vs. completions differ only in their `ResponseFormat`), SSE
streaming, and waiting for a non-streamed answer while watching for the client going away.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from longserve.engine.engine import StepOutput
from longserve.engine.sequence import Sequence
from longserve.errors import LongserveError
from longserve.server.async_engine import RequestStream
from longserve.server.errors import error_body
from longserve.server.protocol import ChatCompletionRequest, GenerationRequest
from longserve.server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from longserve.server.serving_engine import PreparedPrompt, ServerState
from longserve.server.tools import ToolParser, parse_tool_output

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ResponseFormat:
    """How outputs become response bodies; chat and completions differ only here."""

    prefix = ""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"{self.prefix}-{uuid.uuid4().hex}", model, int(time.time())

    def _head(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}

    def start(self) -> BaseModel | None:
        return None

    def for_request(self, request: GenerationRequest) -> ResponseFormat:
        """The format for this request (chat with tools parses the output for calls)."""
        return self

    def piece(self, text: str, finish_reason: str | None) -> BaseModel:
        raise NotImplementedError

    def pieces(self, text: str) -> list[BaseModel]:
        """The chunks for newly generated text (a tool call is held back until it is complete)."""
        return [self.piece(text, None)]

    def finish(self, finish_reason: str | None) -> list[BaseModel]:
        """The last chunks of a stream: whatever was held back, then the finish reason."""
        return [self.piece("", finish_reason)]

    def usage_chunk(self, usage: Usage) -> BaseModel:
        raise NotImplementedError

    def final(self, seq: Sequence, usage: Usage, stats: dict) -> BaseModel:
        raise NotImplementedError


class ChatFormat(ResponseFormat):
    prefix = "chatcmpl"

    def start(self) -> BaseModel:
        return ChatCompletionChunk(
            **self._head(), choices=[ChatChunkChoice(delta=Delta(role="assistant", content=""))]
        )

    def for_request(self, request: GenerationRequest) -> ResponseFormat:
        if isinstance(request, ChatCompletionRequest) and request.tool_mode != "none":
            return ToolChatFormat(self, request)
        return self

    def piece(self, text: str, finish_reason: str | None) -> BaseModel:
        return self.chunk(Delta(content=text or None), finish_reason)

    def chunk(self, delta: Delta, finish_reason: str | None = None) -> BaseModel:
        return ChatCompletionChunk(
            **self._head(), choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)]
        )

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(**self._head(), choices=[], usage=usage)

    def final(self, seq: Sequence, usage: Usage, stats: dict) -> BaseModel:
        choice = ChatChoice(message=ResponseMessage(content=seq.text), finish_reason=seq.finish_reason)
        return ChatCompletion(**self._head(), choices=[choice], usage=usage, longserve=stats)


class ToolChatFormat(ChatFormat):
    """Chat with tools: `<tool_call>` blocks (or a bare JSON call) become `tool_calls`, finish_reason
    "tool_calls". Streamed (OpenAI's shape), a call starts with a chunk carrying its index, id, type and
    name (arguments ""), as soon as the name is written; its arguments follow as they are generated
    (`tools.ToolParser`, incremental); text around calls streams as content."""

    def __init__(self, base: ChatFormat, request: ChatCompletionRequest):
        self.id, self.model, self.created = base.id, base.model, base.created
        self.request, self.parser, self.n_calls = request, ToolParser(request, incremental=True), 0

    def _tool_chunk(self, call_id: str | None, name: str | None, arguments: str) -> BaseModel:
        delta = ToolCallDelta(
            index=self.n_calls,
            id=call_id,
            type="function" if call_id else None,
            function=FunctionCallDelta(name=name, arguments=arguments),
        )
        return self.chunk(Delta(tool_calls=[delta]))

    def _chunks(self, events: list) -> list[BaseModel]:
        out: list[BaseModel] = []
        for kind, value in events:
            if kind == "content":
                out.append(self.piece(value, None))
            elif kind == "head":
                out.append(self._tool_chunk(value.id, value.name, ""))
            elif kind == "args":
                out.append(self._tool_chunk(None, None, value))
            elif kind == "done":
                self.n_calls += 1
            else:  # a whole call at once (a bare JSON call, stringified arguments)
                out += [
                    self._tool_chunk(value.id, value.name, ""),
                    self._tool_chunk(None, None, value.arguments),
                ]
                self.n_calls += 1
        return out

    def pieces(self, text: str) -> list[BaseModel]:
        return self._chunks(self.parser.feed(text))

    def finish(self, finish_reason: str | None) -> list[BaseModel]:
        chunks = self._chunks(self.parser.finish())
        return [*chunks, self.piece("", "tool_calls" if self.n_calls else finish_reason)]

    def final(self, seq: Sequence, usage: Usage, stats: dict) -> BaseModel:
        content, calls = parse_tool_output(seq.text, self.request)
        tool_calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
        ]
        message = ResponseMessage(content=content, tool_calls=tool_calls or None)
        choice = ChatChoice(message=message, finish_reason="tool_calls" if calls else seq.finish_reason)
        return ChatCompletion(**self._head(), choices=[choice], usage=usage, longserve=stats)


class CompletionFormat(ResponseFormat):
    prefix = "cmpl"

    def piece(self, text: str, finish_reason: str | None) -> BaseModel:
        return Completion(**self._head(), choices=[CompletionChoice(text=text, finish_reason=finish_reason)])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return Completion(**self._head(), choices=[], usage=usage)

    def final(self, seq: Sequence, usage: Usage, stats: dict) -> BaseModel:
        choice = CompletionChoice(text=seq.text, finish_reason=seq.finish_reason)
        return Completion(**self._head(), choices=[choice], usage=usage, longserve=stats)


def usage_of(seq: Sequence, prompt: PreparedPrompt) -> Usage:
    """Usage with the original prompt length when the prompt was pruned; prompt tokens served from
    the prefix cache count as prompt tokens (as in OpenAI's usage)."""
    original = prompt.compressed.original_tokens if prompt.compressed is not None else None
    return Usage.of(seq.prompt_len + seq.prefix_tokens, len(seq.output_ids), original, seq.cached_tokens)


def stats_of(seq: Sequence, prompt: PreparedPrompt) -> dict:
    """The `longserve` block of a response: engine stats, end-to-end time, the compression's."""
    stats = {**seq.stats(), "e2e_s": seq.finished_at - seq.arrival}
    if prompt.compressed is not None:  # ttft_s already includes the compression (arrival predates it)
        stats["spec_prefill"] = prompt.compressed.stats()
    return stats


def sse(data: BaseModel | dict) -> str:
    """One server-sent event."""
    body = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {body}\n\n"


async def stream_events(
    stream: RequestStream, fmt: ResponseFormat, include_usage: bool, prompt: PreparedPrompt
):
    """SSE events of a streamed response; errors after the headers are reported in-band."""
    try:
        if (start := fmt.start()) is not None:
            yield sse(start)
        async for out in stream:
            if out.new_text:
                for chunk in fmt.pieces(out.new_text):
                    yield sse(chunk)
            if out.finished:
                for chunk in fmt.finish(out.seq.finish_reason):
                    yield sse(chunk)
                if include_usage:
                    yield sse(fmt.usage_chunk(usage_of(out.seq, prompt)))
    except LongserveError as exc:  # headers are gone: report in-band, as OpenAI does
        yield sse(error_body(exc))
    finally:
        stream.close()
    yield "data: [DONE]\n\n"


async def collect(stream: RequestStream, request: Request) -> StepOutput | None:
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


async def respond(
    state: ServerState,
    request: Request,
    body: GenerationRequest,
    prompt: PreparedPrompt,
    fmt: ResponseFormat,
    arrival: float,
) -> Response:
    """Submit the request and answer it: SSE when it streams, one JSON body (or 499) otherwise."""
    fmt = fmt.for_request(body)
    stream = state.submit(body, prompt, fmt.id, arrival)
    if body.stream:
        events = stream_events(stream, fmt, body.include_usage, prompt)
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers=SSE_HEADERS,
            background=BackgroundTask(stream.close),
        )
    last = await collect(stream, request)
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
    return JSONResponse(
        fmt.final(last.seq, usage_of(last.seq, prompt), stats_of(last.seq, prompt)).model_dump()
    )
