"""Prompts as text with character spans: what may be compressed, what each token covers, and the way back.

A prompt (raw text or chat messages) is rendered once into the text a tokenizer sees, with the character
span of every message's content. Token offsets then tell which tokens are compressible content and which
are chat-template scaffolding (always kept). Going back to text (cross-tokenizer path) uses token "cells":
cell i covers the characters from token i's start to token i+1's start, so the cells of a span partition
it exactly; kept runs of cells are copied verbatim and each dropped gap becomes one delimiter. Keeping
every token therefore reproduces the original text byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from longserve.errors import InvalidParameterError

Prompt = str | list[dict]


@dataclass
class Span:
    start: int
    end: int
    message: int  # index into the messages, -1 for a raw text prompt
    compressible: bool


@dataclass
class Rendered:
    """A prompt as one tokenizer sees it."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]] | None  # None when the tokenizer cannot give them (slow tokenizers)
    spans: list[Span] = field(default_factory=list)
    messages: list[dict] | None = None

    @property
    def has_offsets(self) -> bool:
        return self.offsets is not None


def message_text(content) -> str | None:
    """A message's content as plain text; None when it has non-text parts (images, audio...)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                return None
            parts.append(part["text"])
        return "".join(parts)
    return None


def normalize(prompt: Prompt) -> Prompt:
    """Validate a prompt; message contents become strings (non-text messages are refused)."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidParameterError("the prompt is empty")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise InvalidParameterError("the prompt must be a non-empty string or a non-empty list of messages")
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or "role" not in m:
            raise InvalidParameterError(f"message {i} must be a dict with 'role' and 'content'")
        text = message_text(m.get("content"))
        if text is None:
            raise InvalidParameterError(
                f"message {i} has non-text content parts; only text can be compressed"
            )
        out.append({**m, "content": text})
    if not any(m["content"] for m in out):
        raise InvalidParameterError("the prompt is empty")
    return out


def plain_chat(messages: list[dict]) -> str:
    """What the server feeds template-less models: `role: content` lines, then `assistant: `."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def chat_text(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """(rendered text, whether tokenizing it should add special tokens)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            simple = [{"role": m["role"], "content": m["content"]} for m in messages]
            return tokenizer.apply_chat_template(simple, add_generation_prompt=True, tokenize=False), False
        except Exception:  # templates raise anything (role alternation, unknown roles): fall back
            pass
    return plain_chat(messages), True


def tokenize(tokenizer, text: str, add_special: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    try:
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (TypeError, NotImplementedError, ValueError, AttributeError, KeyError):
        return list(tokenizer.encode(text, add_special_tokens=add_special)), None


def render(tokenizer, prompt: Prompt, compress: Sequence[int] | None = None) -> Rendered:
    """Render and tokenize `prompt`. `compress`: indices of the messages whose content may be compressed
    (default: all)."""
    prompt = normalize(prompt)
    if isinstance(prompt, str):
        ids, offsets = tokenize(tokenizer, prompt, True)
        return Rendered(prompt, ids, offsets, [Span(0, len(prompt), -1, True)])
    text, add_special = chat_text(tokenizer, prompt)
    allowed = set(range(len(prompt))) if compress is None else set(compress)
    spans, cursor = [], 0
    for i, m in enumerate(prompt):
        content = m["content"]
        if not content:
            continue
        pos = text.find(content, cursor)
        if pos < 0 and content.strip():  # some templates trim contents
            content = content.strip()
            pos = text.find(content, cursor)
        if pos < 0:
            continue  # not found verbatim: treat as scaffolding (kept, never rewritten)
        spans.append(Span(pos, pos + len(content), i, i in allowed))
        cursor = pos + len(content)
    ids, offsets = tokenize(tokenizer, text, add_special)
    return Rendered(text, ids, offsets, spans, prompt)


def special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", None) or [])


def token_spans(r: Rendered) -> list[int]:
    """Index of the span each token starts in, -1 for scaffolding (needs offsets)."""
    owner = [-1] * len(r.ids)
    if r.offsets is None:
        return owner
    bounds = sorted((s.start, s.end, k) for k, s in enumerate(r.spans))
    for i, (a, b) in enumerate(r.offsets):
        if b <= a:
            continue  # zero-width: added special tokens
        for start, end, k in bounds:
            if start <= a < end:
                owner[i] = k
                break
    return owner


def forced_mask(
    r: Rendered, tokenizer, keep_special: bool, keep_tail: int, visible: int | None = None
) -> torch.Tensor:
    """Tokens that must survive: non-compressible message contents and the last token (always),
    scaffolding and special tokens (`keep_special`), the last `keep_tail` content tokens of the first
    `visible` tokens."""
    n = len(r.ids) if visible is None else visible
    forced = torch.zeros(n, dtype=torch.bool)
    owner = token_spans(r)[:n]
    if r.offsets is None:
        if not any(s.compressible for s in r.spans):
            forced[:] = True
    else:
        for i, k in enumerate(owner):
            if (k >= 0 and not r.spans[k].compressible) or (k < 0 and keep_special):
                forced[i] = True
    if keep_special:
        specials = special_ids(tokenizer)
        if specials:
            forced |= torch.tensor([t in specials for t in r.ids[:n]], dtype=torch.bool)
    if keep_tail:  # the last `keep_tail` content tokens (trailing template scaffolding does not count)
        counted, i = 0, n
        while i > 0 and counted < keep_tail:
            i -= 1
            counted += r.offsets is None or owner[i] >= 0
        forced[i:] = True
    if n:
        forced[-1] = True  # its logits give the first output token, and decoding continues after it
    return forced


def compressible_tokens(r: Rendered) -> int:
    if r.offsets is None:
        return len(r.ids) if any(s.compressible for s in r.spans) else 0
    owner = token_spans(r)
    return sum(1 for k in owner if k >= 0 and r.spans[k].compressible)


def _snap(text: str, a: int, b: int, lo: int, hi: int, reach: int) -> tuple[int, int]:
    """Widen [a, b) to whole words (up to `reach` characters each way): a chunk edge must not cut a
    number or a name in two."""
    limit = max(lo, a - reach)
    while a > limit and not text[a - 1].isspace() and not text[a].isspace():
        a -= 1
    limit = min(hi, b + reach)
    while b < limit and not text[b].isspace() and not text[b - 1].isspace():
        b += 1
    return a, b


def rebuild(r: Rendered, keep: torch.Tensor, delimiter: str, word_reach: int = 32) -> dict[int, str]:
    """New text of every compressible span (keyed by message index, -1 for raw text) given a keep-mask
    over the tokens. Unchanged spans map to their original text. Kept runs are widened to whole words
    (at most `word_reach` characters; 0 = off), then merged where they touch."""
    if r.offsets is None:
        raise InvalidParameterError(
            "mapping kept tokens back to text needs a tokenizer with offset mappings (a 'fast' HF tokenizer)"
        )
    owner = token_spans(r)
    out: dict[int, str] = {}
    head_mark, tail_mark = delimiter.lstrip(), delimiter.rstrip()
    for k, span in enumerate(r.spans):
        if not span.compressible:
            continue
        toks = [i for i, o in enumerate(owner) if o == k]
        if not toks:
            out[span.message] = r.text[span.start : span.end]
            continue
        bounds = [span.start]  # cell j = [bounds[j], bounds[j + 1]): the cells partition the span
        for i in toks[1:]:
            bounds.append(min(span.end, max(bounds[-1], r.offsets[i][0])))
        bounds.append(span.end)
        ranges: list[list[int]] = []
        run_start = None
        for j, i in enumerate([*toks, None]):
            kept = i is not None and bool(keep[i])
            if kept and run_start is None:
                run_start = j
            elif not kept and run_start is not None:
                a, b = bounds[run_start], bounds[j]
                run_start = None
                if a >= b:
                    continue
                if word_reach:
                    a, b = _snap(r.text, a, b, span.start, span.end, word_reach)
                if ranges and a <= ranges[-1][1]:
                    ranges[-1][1] = max(ranges[-1][1], b)
                else:
                    ranges.append([a, b])
        if not ranges:
            out[span.message] = delimiter.strip()
            continue
        pieces = [r.text[a:b] for a, b in ranges]
        text = pieces[0]
        for piece in pieces[1:]:  # one delimiter per gap, without doubled whitespace around it
            text = text.rstrip() + delimiter + piece.lstrip()
        if ranges[0][0] > span.start:
            text = head_mark + text.lstrip()
        if ranges[-1][1] < span.end:
            text = text.rstrip() + tail_mark
        out[span.message] = text
    return out


def apply(r: Rendered, new_texts: dict[int, str]) -> Prompt:
    """The prompt with compressed contents: a string for raw text, messages otherwise."""
    if r.messages is None:
        return new_texts.get(-1, r.text)
    return [{**m, "content": new_texts[i]} if i in new_texts else dict(m) for i, m in enumerate(r.messages)]


def count_tokens(tokenizer, prompt: Prompt) -> int:
    """Prompt tokens as a target would see them (chat template applied to messages)."""
    if isinstance(prompt, str):
        return len(tokenizer.encode(prompt, add_special_tokens=True))
    text, add_special = chat_text(tokenizer, prompt)
    return len(tokenizer.encode(text, add_special_tokens=add_special))


def content_tokens(tokenizer, texts: Sequence[str]) -> int:
    return sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts if t)
