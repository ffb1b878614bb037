"""Structured output: a JSON schema compiled by `llguidance` into a token mask the sampler applies.

Why llguidance: one small wheel with no dependencies (xgrammar pulls triton), a Rust Earley parser that
computes a mask over the whole vocabulary in about a millisecond, and a JSON-schema compiler. It is an
optional dependency (`pip install longserve[structured]`); without it, asking for a grammar is a clear
error. Tokenizers: a fast Hugging Face tokenizer, or any object with `token_bytes()` (the bytes of every
id, e.g. a byte-level test tokenizer) and `eos_token_id`.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from typing import Any

import torch

from longserve.errors import InvalidParameterError

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF tokenizer -> LLTokenizer
_lock = threading.Lock()
#: json.dumps' separators and no other whitespace: with llguidance's default (any whitespace between
#: tokens) a model may emit newlines forever and never close the object.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def available() -> bool:
    """Whether the optional llguidance is installed (structured output works)."""
    try:
        _llguidance()
    except InvalidParameterError:
        return False
    return True


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise InvalidParameterError(
            "structured output (response_format) needs the optional package llguidance: "
            "pip install 'longserve[structured]'"
        ) from None
    return llguidance


class _ByteTokens:
    """llguidance's view of a tokenizer that lists its tokens' bytes (`TokenizerWrapper` protocol)."""

    def __init__(self, tokenizer: Any):
        self.tokens = list(tokenizer.token_bytes())
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = [self.eos_token_id]
        self.is_tokenizer_wrapper = True
        self._encode = tokenizer.encode

    def __call__(self, text: str | bytes) -> list[int]:
        return self._encode(text.decode() if isinstance(text, bytes) else text, add_special_tokens=False)


def ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: list[int]):
    """The (cached: building one reads the whole vocabulary, ~0.5 s) llguidance tokenizer of `tokenizer`,
    with the model's logit width and every EOS id (so a finished grammar may end on any of them)."""
    llg = _llguidance()
    with _lock:
        cached = _tokenizers.get(tokenizer)
        if cached is not None:
            return cached
        eos = sorted(eos_ids) or None
        if hasattr(tokenizer, "token_bytes"):
            built = llg.LLTokenizer(_ByteTokens(tokenizer), n_vocab=vocab_size, eos_token=eos)
        else:
            try:
                built = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
            except ValueError as exc:
                raise InvalidParameterError(f"structured output needs a fast tokenizer: {exc}") from None
        _tokenizers[tokenizer] = built
        return built


class GrammarMatcher:
    """One sequence's position in the grammar (`sampler.Constraint`)."""

    def __init__(self, llg, tokenizer, grammar: str):
        self._matcher = llg.LLMatcher(tokenizer, grammar)
        self._eos = list(tokenizer.eos_tokens)
        self._words = (tokenizer.vocab_size + 31) // 32
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self, vocab_size: int) -> torch.Tensor:
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        mask = ((words[:, None] >> self._bits) & 1).bool().flatten()
        mask = torch.nn.functional.pad(mask, (0, max(0, vocab_size - mask.numel())))[:vocab_size]
        if not mask.any():  # a matcher in error (cannot happen when only allowed tokens are fed): end it
            mask[[t for t in self._eos if t < vocab_size]] = True
        return mask

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)  # an EOS after the grammar is complete is accepted too

    @property
    def error(self) -> str:
        return self._matcher.get_error() if self._matcher.is_error() else ""


class JSONGrammar:
    """Output constrained to JSON matching `schema` (`{"type": "object"}`: any JSON object); with `wrap`
    (opening, closing text) that JSON between the two, e.g. a tool call's `<tool_call>\\n` ... `\\n</tool_call>`."""

    def __init__(
        self,
        schema: dict,
        tokenizer: Any,
        vocab_size: int,
        eos_ids: list[int],
        wrap: tuple[str, str] | None = None,
    ):
        self._llg = _llguidance()
        self._tokenizer = ll_tokenizer(tokenizer, vocab_size, eos_ids)
        try:
            if wrap is None:
                self.grammar = self._llg.LLMatcher.grammar_from_json_schema(
                    json.dumps(schema), defaults=_COMPACT
                )
            else:
                self.grammar = self._llg.LLMatcher.grammar_from_lark(self._wrapped(schema, tokenizer, *wrap))
        except ValueError as exc:
            raise InvalidParameterError(f"invalid JSON schema: {exc}") from None
        error = self._llg.LLMatcher.validate_grammar(self.grammar, self._tokenizer)
        if error:
            raise InvalidParameterError(f"unsupported JSON schema: {error.splitlines()[0]}")

    def _wrapped(self, schema: dict, tokenizer: Any, opening: str, closing: str) -> str:
        """A Lark grammar: `opening`, the JSON, `closing`. Text that is one added token of the tokenizer
        (Qwen's `<tool_call>`) must be written as that token (`<[id]>`): llguidance does not match added
        tokens by their text."""
        schema = {**schema, "x-guidance": _COMPACT}
        return f"start: {self._literal(opening, tokenizer)} value {self._literal(closing, tokenizer)}\nvalue: %json {json.dumps(schema)}\n"

    def _literal(self, text: str, tokenizer: Any) -> str:
        parts = []
        for piece in re.split(r"(\s+)", text):
            if not piece:
                continue
            ids = tokenizer.encode(piece, add_special_tokens=False) if not piece.isspace() else []
            special = len(ids) == 1 and self._tokenizer.is_special_token(ids[0])
            parts.append(f"<[{ids[0]}]>" if special else json.dumps(piece))
        return " ".join(parts)

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._llg, self._tokenizer, self.grammar)


def json_grammar(schema: dict | None, loaded, wrap: tuple[str, str] | None = None) -> JSONGrammar:
    """A grammar for `loaded`'s tokenizer: JSON matching `schema`, or any JSON object when None; `wrap`:
    see `JSONGrammar` (tool calls)."""
    schema = {"type": "object"} if schema is None else schema
    return JSONGrammar(schema, loaded.tokenizer, loaded.args.vocab_size, sorted(loaded.eos_ids), wrap)
