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


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: None = None
    finish_reason: str | None


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer
    def _present_only(self) -> dict[str, str]:  # OpenAI omits absent delta keys
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


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
