"""OpenAI response bodies (and stream chunks) for `/v1/chat/completions` and `/v1/completions`; they
are also the documented 200 schemas in /openapi.json."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, model_serializer


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (OpenAI's field)


class Usage(BaseModel):
    """`prompt_tokens` are the tokens the target prefilled; with speculative prefill
    `original_prompt_tokens` is the prompt's length before pruning (absent otherwise)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()
    original_prompt_tokens: int | None = None

    @classmethod
    def of(
        cls,
        prompt_tokens: int,
        completion_tokens: int,
        original_prompt_tokens: int | None = None,
        cached_tokens: int = 0,
    ) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            original_prompt_tokens=original_prompt_tokens,
        )

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler) -> dict[str, Any]:
        data = handler(self)
        if data.get("original_prompt_tokens") is None:
            data.pop("original_prompt_tokens", None)
        return data


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(BaseModel):
    """`content` is None when the answer is only tool calls (OpenAI's shape); `tool_calls` is omitted
    when there are none."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_calls(self, handler) -> dict[str, Any]:
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: None = None
    finish_reason: str | None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call: the first has `id`, `type` and the name; the next, arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer
    def _present_only(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        out.update({k: v for k, v in (("id", self.id), ("type", self.type)) if v is not None})
        out["function"] = self.function.model_dump(exclude_none=True)
        return out


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer
    def _present_only(self) -> dict[str, Any]:  # OpenAI omits absent delta keys
        out: dict[str, Any] = {
            k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None
        }
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class _Response(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage | None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    longserve: dict[str, Any] | None = None  # request stats: TTFT, KV bytes, compression ratio


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class Completion(_Response):
    """A completion, and (with one choice carrying a piece of text) a completion stream chunk."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    longserve: dict[str, Any] | None = None
