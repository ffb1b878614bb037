"""Structured output in a request: `response_format`, and OpenAI tool calling in a chat request
(`tools`, `tool_choice`, `parallel_tool_calls`, and the chat messages that carry a tool loop: assistant
`tool_calls`, `role: "tool"` results).

Why validated here and not later: a tool without a name, parameters that are not an object schema or a
`tool_choice` naming an unknown tool would otherwise surface as a template error or a silently ignored
choice; each is a 400 naming its field. Rendering and parsing live in `server.tools`.
"""

from __future__ import annotations

import contextlib
import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from longserve.server.errors import APIError

#: As `protocol.REQUEST_CONFIG` (strict, unknown fields ignored); repeated so this module needs no import
#: of `protocol`, which imports it.
_CONFIG = ConfigDict(extra="allow", strict=True)
#: OpenAI's rule for function names (they are echoed into prompts and grammars).
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class JSONSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's `{"name": ..., "schema": {...}, "strict": ...}`."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class _Format(BaseModel):
    """`response_format`: `text` (no constraint), `json_object` (any JSON object) or `json_schema`."""

    model_config = ConfigDict(extra="allow", strict=True)
    constrained: ClassVar[bool] = True

    @property
    def target_schema(self) -> dict[str, Any] | None:
        """The JSON schema to follow (None: any JSON object)."""
        return None


class TextFormat(_Format):
    type: Literal["text"]
    constrained: ClassVar[bool] = False


class JSONObjectFormat(_Format):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Format):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat

    @property
    def target_schema(self) -> dict[str, Any] | None:
        return self.json_schema.json_schema


ResponseFormatSpec = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaResponseFormat, Field(discriminator="type")
]


class FunctionDef(BaseModel):
    """`tools[i].function`: a name, a description, and the JSON schema of its arguments (an object)."""

    model_config = _CONFIG
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None and schema.get("type", "object") != "object":
            raise ValueError(
                f"parameters must be a JSON schema of type 'object' (got type {schema['type']!r})"
            )
        return schema

    @property
    def arguments_schema(self) -> dict[str, Any]:
        """What `arguments` must match; no parameters means none may be given (OpenAI's semantics)."""
        if self.parameters is None:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return {"type": "object", **self.parameters}


class ToolSpec(BaseModel):
    model_config = _CONFIG
    type: Literal["function"]
    function: FunctionDef

    def render(self) -> dict[str, Any]:
        """The tool as chat templates (and the fallback system message) take it."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class FunctionName(BaseModel):
    model_config = _CONFIG
    name: str


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`: that tool must be called."""

    model_config = _CONFIG
    type: Literal["function"]
    function: FunctionName


class FunctionCallIn(BaseModel):
    model_config = _CONFIG
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    model_config = _CONFIG
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def render(self) -> dict[str, Any]:
        """Arguments as a dict where they parse (templates `tojson` them; a string would be quoted twice)."""
        args: Any = self.function.arguments
        if isinstance(args, str):
            with contextlib.suppress(ValueError):
                args = json.loads(args)
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.function.name, "arguments": args},
        }


class ContentPart(BaseModel):
    model_config = _CONFIG
    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str


class ChatMessage(BaseModel):
    model_config = _CONFIG
    role: str
    content: str | list[ContentPart] | None = ""  # absent: "" (chat templates index it)
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a `tool` message: the call it answers

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[ContentPart] | None) -> str:
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise ValueError("only text content parts are supported")
            return "".join(p.text for p in content)
        return content or ""

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the tool_call_id it answers")
        return self

    def render(self) -> dict[str, Any]:
        """The message as chat templates take it (tool fields only where set)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.render() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolFields(BaseModel):
    """The tool-calling fields of a chat request (mixed into `ChatCompletionRequest`)."""

    model_config = _CONFIG
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # True (OpenAI's default): several calls may be returned

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[ToolSpec] | None) -> list[ToolSpec] | None:
        names = [t.function.name for t in tools or []]
        if len(set(names)) != len(names):
            raise ValueError(
                f"tool names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}"
            )
        return tools or None

    @model_validator(mode="after")
    def _choice_matches_tools(self) -> ToolFields:
        """An APIError (not a ValueError) so the 400 names `tool_choice` rather than the whole body."""
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise APIError("tool_choice needs tools: send the tools it may call", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names:
            raise APIError(
                f"tool_choice names the function {choice.function.name!r}, which is not among the tools "
                f"({', '.join(self.tool_names)})",
                param="tool_choice",
            )
        return self

    @property
    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or []]

    @property
    def tool_mode(self) -> str:
        """ "none" (no tools in the prompt, output never parsed), "auto", "required" or "named"."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def forced_tools(self) -> list[ToolSpec]:
        """The tools the output is constrained to call ("required": any; "named": that one; else none)."""
        mode = self.tool_mode
        if mode == "required":
            return list(self.tools or [])
        if mode == "named":
            name = self.tool_choice.function.name  # type: ignore[union-attr]
            return [t for t in self.tools or [] if t.function.name == name]
        return []

    @property
    def parallel(self) -> bool:
        return self.parallel_tool_calls is not False
