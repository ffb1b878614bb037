"""OpenAI request/response bodies for `/v1/chat/completions` and `/v1/completions`.

Unknown OpenAI fields (`user`, `logit_bias`, ...) are accepted and ignored, as most OpenAI-compatible
servers do; fields that would change the answer and that we cannot honour (`n > 1`, `logprobs`, `echo`,
`suffix`, several prompts, `tools`/`tool_choice`/`functions`) are rejected with 400 rather than silently
ignored. Honoured: `presence_penalty`/`frequency_penalty` (OpenAI's semantics, in the sampler) and
`response_format` (`json_object`, `json_schema`: grammar-constrained decoding, `engine.grammar`). Extra
body fields: `top_k`, `ignore_eos`, `kv_policy` (`{"name": "snapstream", "budget": 1024, "window": 64,
...}`), `spec_prefill` (`false`, `true` or `{"keep": 0.25, "draft": NAME}`: see
`longserve.specprefill.serving`) and `speculative` (`false` sends a request to the batched engine on a
server started with `--draft`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from longserve.engine.sampler import PENALTY_LIMIT, SEED_LIMIT, Grammar, SamplingParams


class KVPolicySpec(BaseModel):
    """A request's KV policy; keys other than name/budget/ratio (window, n_sink...) go to the policy."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None
    budget: int | None = None
    ratio: float | None = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class JSONSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's `{"name": ..., "schema": {...}, "strict": ...}`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormatSpec(BaseModel):
    """`text` (no constraint), `json_object` (any JSON object) or `json_schema` (JSON matching it)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormatSpec:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self

    @property
    def constrained(self) -> bool:
        return self.type != "text"

    @property
    def target_schema(self) -> dict[str, Any] | None:
        """The JSON schema to follow (None: any JSON object)."""
        return self.json_schema.json_schema if self.type == "json_schema" and self.json_schema else None


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    # the ranges SamplingParams enforces, checked here so a bad value is a 400 naming its field (JSON
    # allows Infinity/NaN and integers of any size; an unchecked seed overflowed in the engine thread)
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)  # OpenAI's default; 0 = greedy
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=-1)  # extra; 0 or -1 = off (vLLM's convention)
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    presence_penalty: float = Field(default=0.0, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT, allow_inf_nan=False)
    response_format: ResponseFormatSpec | None = None
    # tool calling needs parsing the model's calls out of its text per chat template: not done, so refused
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extra: generate exactly max_tokens (benchmarks)
    kv_policy: KVPolicySpec | None = None
    spec_prefill: Any = None  # validated by longserve.specprefill.serving.parse_option (400 on bad values)
    speculative: bool | None = None  # None: the server's default (speculative iff it has a --draft)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("tools", "functions", "function_call")
    @classmethod
    def _no_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(f"'{info.field_name}' is not supported by this server (no tool calling)")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none"):
            raise ValueError("'tool_choice' is not supported by this server (no tool calling)")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def constrained(self) -> bool:
        """Whether the output follows a grammar (`response_format` json_object / json_schema)."""
        return self.response_format is not None and self.response_format.constrained

    @property
    def needs_sampler(self) -> bool:
        """Whether this request needs the batched sampler's features (the speculative decoder has none)."""
        return self.constrained or bool(self.presence_penalty or self.frequency_penalty)

    def sampling_params(self, max_new_tokens: int, grammar: Grammar | None = None) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            stop=list(self.stop or []),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            grammar=grammar,
        )


def _reject_if_set(value: Any, field: str) -> Any:
    if value:
        raise ValueError(f"'{field}' is not supported by this server")
    return value


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[ContentPart] | None) -> str:
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise ValueError("only text content parts are supported")
            return "".join(p.text for p in content)
        return content or ""


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _reject_if_set(value, info.field_name)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _reject_if_set(value, info.field_name)

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if self.best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise ValueError("only one prompt per request is supported (n=1)")
            self.prompt = p[0]
        return self


# ---- responses -------------------------------------------------------------------------------------


class Usage(BaseModel):
    """`prompt_tokens` are the tokens the target prefilled; with speculative prefill
    `original_prompt_tokens` is the prompt's length before pruning (absent otherwise)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    original_prompt_tokens: int | None = None

    @classmethod
    def of(
        cls, prompt_tokens: int, completion_tokens: int, original_prompt_tokens: int | None = None
    ) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
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
