"""OpenAI request bodies (responses: `server.responses`) for `/v1/chat/completions` and `/v1/completions`.

Unknown OpenAI fields (`user`, `logit_bias`, ...) are accepted and ignored, as most OpenAI-compatible
servers do; fields that would change the answer and that we cannot honour (`n > 1`, `logprobs`, `echo`,
`suffix`, several prompts, the legacy `functions`/`function_call`, `tools` on /v1/completions) are
rejected with 400 rather than silently ignored. Honoured: `presence_penalty`/`frequency_penalty` (OpenAI's
semantics, in the sampler), `response_format` (`json_object`, `json_schema`: grammar-constrained
decoding, `engine.grammar`) and, on chat, `tools`/`tool_choice`/`parallel_tool_calls` (`protocol_tools`,
`server.tools`). Extra
body fields: `top_k`, `ignore_eos`, `kv_policy` (`{"name": "snapstream", "budget": 1024, "window": 64,
...}`), `spec_prefill` (`false`, `true` or `{"keep": 0.25, "draft": NAME}`: see
`longserve.specprefill.serving`) and `speculative` (`false` sends a request to the batched engine on a
server started with `--draft`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from longserve.engine.sampler import PENALTY_LIMIT, SEED_LIMIT, Grammar, SamplingParams
from longserve.server.errors import APIError
from longserve.server.protocol_tools import ChatMessage, ResponseFormatSpec, ToolFields

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "GenerationRequest"]

#: Request bodies are validated strictly (no `0` for `false`, no `"1"` for a number), so what the server
#: accepts is exactly what /openapi.json describes; unknown fields are still allowed (and ignored).
REQUEST_CONFIG = ConfigDict(extra="allow", strict=True)
NonEmpty = Annotated[str, Field(min_length=1)]


def has_surrogate(value: Any) -> bool:
    """Whether a JSON value holds a lone UTF-16 surrogate (`"\\ud800"` parses to a str UTF-8 refuses)."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    return False


def integral_floats(value: Any) -> Any:
    """Integers as JSON Schema defines them: `163.0` is one (strict mode alone would refuse it), `true`
    and `"163"` are not (lax mode would take them). Applied before validation, through lists."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral_floats(v) for v in value]
    return value


SPEC_PREFILL_OBJECT = {
    "type": "object",
    "properties": {
        "enabled": {"type": "boolean"},
        "keep": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "draft": {"type": "string"},
    },
    "additionalProperties": False,
}


def _only(*values: Any) -> dict[str, Any]:
    """Schema text for a field whose type admits more than the server accepts (refused by a validator
    with a message that says why), so schema-driven clients and fuzzers know the real domain."""
    return {"json_schema_extra": {"enum": list(values)}}


class KVPolicySpec(BaseModel):
    """A request's KV policy; keys other than name/budget/ratio (window, n_sink...) go to the policy."""

    model_config = REQUEST_CONFIG
    name: str | None = None
    budget: int | None = None
    ratio: float | None = None

    @field_validator("budget", mode="before")
    @classmethod
    def _json_int(cls, value: Any) -> Any:
        return integral_floats(value)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CachePrefixSpec(BaseModel):
    """Compress-and-cache the start of the prompt: `{"policy": "snapkv", "ratio": 0.25}` (+ `"tokens": N`;
    chat requests default to everything before the last message). Other keys go to the policy."""

    model_config = REQUEST_CONFIG
    policy: str = "full"
    budget: int | None = Field(default=None, ge=1)
    ratio: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    tokens: int | None = Field(default=None, ge=1)

    @field_validator("budget", "tokens", mode="before")
    @classmethod
    def _json_int(cls, value: Any) -> Any:
        return integral_floats(value)

    def as_dict(self) -> dict[str, Any]:
        return {**(self.model_extra or {}), **self.model_dump(exclude_none=True)}


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = REQUEST_CONFIG

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """Text that is not Unicode is refused naming its field before anything tokenizes or echoes it
        (an APIError, not a ValueError, so pydantic lets it through with its `param`)."""
        if isinstance(data, dict):
            for key, value in data.items():
                if has_surrogate(key) or has_surrogate(value):
                    name = key.encode(errors="backslashreplace").decode()
                    raise APIError(
                        f"'{name}' holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode",
                        param=name,
                    )
        return data

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
    # the legacy (pre-tools) function calling: refused, pointing at `tools`
    functions: list[Any] | None = Field(default=None, json_schema_extra={"maxItems": 0})
    function_call: Any = Field(default=None, **_only("none", None))
    stop: NonEmpty | list[NonEmpty] | None = None
    n: int = Field(default=1, **_only(1))
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extra: generate exactly max_tokens (benchmarks)
    kv_policy: KVPolicySpec | None = None
    cache_prefix: CachePrefixSpec | None = None  # extra: see CachePrefixSpec (needs --prefix-cache-memory)
    # validated by longserve.specprefill.serving.parse_option (400 on bad values); the schema says what it takes
    spec_prefill: Any = Field(
        default=None,
        json_schema_extra={"anyOf": [{"type": "boolean"}, {"type": "null"}, SPEC_PREFILL_OBJECT]},
    )
    speculative: bool | None = None  # None: the server's default (speculative iff it has a --draft)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("max_tokens", "top_k", "seed", "n", mode="before")
    @classmethod
    def _json_ints(cls, value: Any) -> Any:
        return integral_floats(value)

    @field_validator("functions", "function_call")
    @classmethod
    def _no_legacy_functions(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, "none", []):
            raise ValueError(
                f"the legacy '{info.field_name}' is not supported: send 'tools' and 'tool_choice' instead"
            )
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
    def given_max_tokens(self) -> dict[str, int]:
        """Every max-tokens field the request set (each must fit the server, even one that is overridden)."""
        return {} if self.max_tokens is None else {"max_tokens": self.max_tokens}

    @property
    def constrained(self) -> bool:
        """Whether the output follows a grammar (`response_format` json_object / json_schema)."""
        return self.response_format is not None and self.response_format.constrained

    @property
    def needs_sampler(self) -> bool:
        """Whether this request needs the batched sampler's features (the speculative decoder has none)."""
        return (
            self.constrained
            or bool(self.presence_penalty or self.frequency_penalty)
            or self.cache_prefix is not None
        )

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


class ChatCompletionRequest(GenerationRequest, ToolFields):
    """A chat request; tool calling (`ToolFields`) constrains the output when a call is required."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = Field(default=None, **_only(False, None))

    @field_validator("logprobs")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _reject_if_set(value, info.field_name)

    @field_validator("max_completion_tokens", mode="before")
    @classmethod
    def _json_int_chat(cls, value: Any) -> Any:
        return integral_floats(value)

    @model_validator(mode="after")
    def _one_constraint(self) -> ChatCompletionRequest:
        if self.forced_tools and super().constrained:
            raise APIError(
                "a required tool call is already JSON: send response_format with tool_choice 'auto' or 'none'",
                param="tool_choice",
            )
        return self

    @property
    def constrained(self) -> bool:
        """A required (or named) tool call is grammar-constrained, as `response_format` is."""
        return super().constrained or bool(self.forced_tools)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def given_max_tokens(self) -> dict[str, int]:
        given = super().given_max_tokens
        return (
            given
            if self.max_completion_tokens is None
            else {**given, "max_completion_tokens": self.max_completion_tokens}
        )


class CompletionRequest(GenerationRequest):
    prompt: (
        NonEmpty
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=1)]
    )
    echo: bool = Field(default=False, **_only(False))
    logprobs: int | None = Field(default=None, **_only(0, None))
    suffix: str | None = Field(default=None, **_only("", None))
    best_of: int | None = Field(default=None, **_only(1, None))
    # tool calling is a chat feature (a template renders the tools): refused here, not ignored
    tools: list[Any] | None = Field(default=None, json_schema_extra={"maxItems": 0})
    tool_choice: Any = Field(default=None, **_only("none", None))

    @field_validator("prompt", "logprobs", "best_of", mode="before")
    @classmethod
    def _json_int_prompt(cls, value: Any) -> Any:
        return integral_floats(value)

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _reject_if_set(value, info.field_name)

    @field_validator("tools", "tool_choice")
    @classmethod
    def _chat_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, "none", []):
            raise ValueError(f"'{info.field_name}' applies to /v1/chat/completions only")
        return value

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
