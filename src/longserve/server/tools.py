"""Tool calling for chat requests: tools rendered into the prompt, the grammar of a required call, and the
parser that turns the model's text back into OpenAI `tool_calls`.

One call format for every model: Qwen/Hermes' `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
</tool_call>`. A chat template that knows tools (its source mentions `tools`, as Qwen2.5's does) renders
them itself, and its models were trained on that format; for any other template (or none) the tools are
listed in a system message (`FALLBACK_INSTRUCTIONS`) asking for the same format, assistant `tool_calls`
are written back as those blocks and `tool` results as `<tool_response>` user turns, so a multi-turn tool
loop renders through any template. A required or named call is grammar-constrained to that format with
the tool's parameters schema, so it always parses; under "auto" the parser also accepts a bare JSON
object naming a tool, and anything it cannot parse stays plain content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from longserve.server.protocol_tools import ToolFields, ToolSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
#: What a required call is constrained to (the JSON between the newlines).
WRAP = (OPEN + "\n", "\n" + CLOSE)

FALLBACK_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)


def template_knows_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders `tools` itself (else `fallback_messages` does it)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one, or a dedicated "tool_use" one
        return "tool_use" in template or "tools" in str(template.get("default", ""))
    return isinstance(template, str) and "tools" in template


def call_text(name: str, arguments: Any) -> str:
    args = json.loads(arguments) if isinstance(arguments, str) and _is_json(arguments) else arguments
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def fallback_messages(messages: list[dict], tools: list[ToolSpec] | None) -> list[dict]:
    """`messages` for a template without tool support: the tools in the (first) system message, earlier
    calls as `<tool_call>` blocks in assistant text, tool results as `<tool_response>` user text."""
    out: list[dict] = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join([m["content"], *calls]).strip()})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        listing = "\n".join(json.dumps(t.render(), ensure_ascii=False) for t in tools)
        system = FALLBACK_INSTRUCTIONS.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def call_schema(tools: list[ToolSpec]) -> dict[str, Any]:
    """The JSON of one call to any of `tools`: `{"name": <its name>, "arguments": <its parameters>}`."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": t.function.arguments_schema},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


#: The start of a call whose arguments are an object, as models write it: enough to announce the call
#: while its arguments still stream.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*(?=\{)')


class _ObjectEnd:
    """Where a JSON value that starts with `{` ends, fed piece by piece (quotes and escapes aware)."""

    def __init__(self):
        self.depth, self.in_str, self.escaped, self.done = 0, False, False, False

    def scan(self, text: str) -> int | None:
        """The index just past the closing brace within `text`, or None while the object is open."""
        for i, ch in enumerate(text):
            if self.in_str:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return None


def _raw_arguments(text: str) -> str | None:
    """The arguments object of a call exactly as written (what a stream sends), if it has that shape."""
    head = _HEAD.match(text)
    if head is None:
        return None
    end = _ObjectEnd().scan(text[head.end() :])
    return text[head.end() : head.end() + end] if end else None


def parse_call(text: str, names: list[str]) -> ToolCall | None:
    """One call from its JSON (`{"name", "arguments"}`; `parameters` and stringified arguments accepted),
    or None when it is not a call to one of `names`. The arguments are kept as the model wrote them when
    they are an object (so a streamed call and a whole one agree), else re-serialized."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    raw = _raw_arguments(text)
    if raw is None or json.loads(raw) != args:
        raw = json.dumps(args, ensure_ascii=False)
    return ToolCall(value["name"], raw)


class ToolParser:
    """Splits generated text into content and tool calls as it streams (`feed`, then `finish`); each
    returns events: `("content", text)` or `("call", ToolCall)`. Text that may still become a call (a
    partial `<tool_call>`, an open block, output that starts like a bare JSON object) is held back; a
    block that does not parse is given back as content, never dropped.

    `incremental` (streams): a block that starts `{"name": <a tool>, "arguments": {` is announced at once
    (`("head", call)`), its arguments follow as written (`("args", text)`) and `("done", call)` ends it;
    once announced a call cannot become content again (as in vLLM), so a whole answer is parsed without."""

    def __init__(self, request: ToolFields, incremental: bool = False):
        self.names, self.parallel, self.incremental = request.tool_names, request.parallel, incremental
        self.head: ToolCall | None = None  # the call being streamed
        self.args_from, self.args_end = 0, _ObjectEnd()  # buffer index of unsent arguments; their end
        self.buffer, self.in_call, self.calls, self.started = "", False, 0, False
        self.bare = False  # holding output that began with "{": decided at the end
        self.lead = ""  # whitespace before an open block: dropped if it is a call, content if not

    def _call(self, call: ToolCall | None, raw: str) -> list[tuple[str, Any]]:
        lead, self.lead = self.lead, ""
        if call is None:
            return [("content", lead + raw)]
        self.calls += 1
        return [("call", call)] if self.parallel or self.calls == 1 else []  # one call: later ones dropped

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buffer += text
        events: list[tuple[str, Any]] = []
        while self.buffer:
            if self.bare:
                break
            if self.in_call:
                if self.incremental and (self.parallel or self.calls == 0):
                    events += self._stream_arguments()
                end = self.buffer.find(CLOSE)
                if end < 0:
                    break
                raw, self.buffer = self.buffer[: end + len(CLOSE)], self.buffer[end + len(CLOSE) :]
                self.in_call = False
                events += (
                    self._done()
                    if self.head
                    else self._call(parse_call(raw[len(OPEN) : end], self.names), raw)
                )
                continue
            start = self.buffer.find(OPEN)
            if start >= 0:
                before, self.buffer = self.buffer[:start], self.buffer[start:]
                if before.strip():
                    events.append(("content", before))
                else:
                    self.lead = before
                self.in_call = self.started = True
                continue
            if not self.started and self.buffer.lstrip().startswith("{"):
                self.bare = True
                break
            keep = _partial_suffix(self.buffer, OPEN)
            ready = self.buffer[: len(self.buffer) - keep]
            if ready.strip():  # whitespace waits for what follows it (dropped next to a call)
                events.append(("content", ready))
                self.buffer, self.started = self.buffer[len(ready) :], True
            break
        return events

    def _stream_arguments(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        if self.head is None:
            head = _HEAD.match(self.buffer, len(OPEN))
            if head is None or head.group(1) not in self.names:
                return out
            self.head, self.args_from, self.args_end = ToolCall(head.group(1), ""), head.end(), _ObjectEnd()
            out.append(("head", self.head))
        if not self.args_end.done:
            end = self.args_end.scan(self.buffer[self.args_from :])
            stop = len(self.buffer) if end is None else self.args_from + end
            piece, self.args_from = self.buffer[self.args_from : stop], stop
            if piece:
                self.head.arguments += piece
                out.append(("args", piece))
        return out

    def _done(self) -> list[tuple[str, Any]]:
        call, self.head, self.lead = self.head, None, ""
        self.calls += 1
        return [("done", call)]

    def finish(self) -> list[tuple[str, Any]]:
        """What is still held when generation ends: an unclosed block or a bare JSON call, else content."""
        rest, self.buffer = self.buffer, ""
        if self.in_call:
            self.in_call = False
            if self.head is not None:
                return self._done()
            return self._call(parse_call(rest[len(OPEN) :], self.names), rest)
        if self.bare:
            self.bare = False
            return self._call(parse_call(rest.strip(), self.names), rest)
        return [("content", rest)] if rest.strip() or (rest and not self.calls) else []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (may complete later)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def parse_tool_output(text: str, request: ToolFields) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer; with no call the content is `text` unchanged."""
    parser = ToolParser(request)
    events = parser.feed(text) + parser.finish()
    calls = [value for kind, value in events if kind == "call"]
    if not calls:
        return text, []
    content = "".join(value for kind, value in events if kind == "content").strip()
    return content or None, calls
