"""An eval `Target` that answers with speculative prefill: a draft prunes the prompt, the local target answers.

"query_aware": the draft scores `context + question` (the question steers which chunks survive);
"query_agnostic": the draft scores the context alone and the question is appended uncompressed, as when
one pruned document is reused for many questions. `ttft_s` includes the draft's scoring.

`longserve eval --policy specprefill@0.25[:draft=NAME][:keep_tail=64]...` works once this module is
imported: `register()` (run at import) adds a spec parser to the eval CLI's extension point.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any

from longserve.errors import InvalidParameterError
from longserve.eval.specs import parse_value, register_spec_parser
from longserve.eval.target import EvalRequest, EvalResult
from longserve.llm import LLM
from longserve.loader import DTYPES
from longserve.specprefill.compress import SpeculativePrefill
from longserve.specprefill.scoring import SpecPrefillConfig

PREFIX = "specprefill"


class SpecPrefillTarget:
    """`SpecPrefillTarget(target_llm, draft_llm, SpecPrefillConfig(keep=0.25))`; default name
    `specprefill@0.25` (so reports parse it as policy "specprefill", budget 0.25)."""

    def __init__(
        self,
        target: LLM,
        draft: LLM | SpeculativePrefill,
        config: SpecPrefillConfig | None = None,
        *,
        name: str | None = None,
        kv_policy: str | None = None,
        kv_budget: int | None = None,
        kv_ratio: float | None = None,
        **policy_kwargs: Any,
    ):
        self.target = target
        if isinstance(draft, SpeculativePrefill):
            self.sp = SpeculativePrefill(draft.draft, config) if config is not None else draft
        else:
            self.sp = SpeculativePrefill(draft, config)
        self.name = name or f"specprefill@{self.sp.config.keep:g}"
        self.policy = dict(kv_policy=kv_policy, kv_budget=kv_budget, kv_ratio=kv_ratio, **policy_kwargs)

    def count_tokens(self, text: str) -> int:
        return len(self.target.tokenizer.encode(text, add_special_tokens=False))

    def _prompt(self, request: EvalRequest):
        text = request.context + request.question
        return [{"role": "user", "content": text}] if self.target.tokenizer.chat_template else text

    def answer(self, requests: list[EvalRequest]) -> list[EvalResult]:
        results = []
        for request in requests:  # one at a time: TTFT is then the request's own, not the batch's
            if request.setting == "query_agnostic":
                cp = self.sp.compress_context(self.target, request.context, request.question)
            else:
                cp = self.sp.compress(self.target, self._prompt(request))
            out = self.sp.generate_compressed(
                self.target, [cp], max_new_tokens=request.max_new_tokens, **self.policy
            )[0]
            stats = out.stats
            results.append(
                EvalResult(
                    text=out.text,
                    prompt_tokens=cp.original_tokens,
                    ttft_s=stats["ttft_s"] or 0.0,
                    decode_tok_s=stats.get("decode_tokens_per_s") or 0.0,
                    kv_bytes=stats.get("kv_bytes_peak", 0),
                    extra={
                        "setting": request.setting,
                        "setting_applied": True,
                        "draft": self.sp.draft.loaded.name,
                        "target_ttft_s": stats.get("target_ttft_s"),
                        "finish_reason": out.finish_reason,
                        "completion_tokens": len(out.token_ids),
                        **{f"sp_{k}": v for k, v in cp.stats().items()},
                    },
                )
            )
        return results


@functools.cache
def _draft(name: str, dtype: str) -> LLM:
    """One loaded draft per name, shared by every keep rate of a run."""
    return LLM(name, dtype=dtype, progress=False)


@dataclass(frozen=True)
class SpecPrefillSpec:
    """An eval target spec: `specprefill@KEEP[:draft=NAME][:OPTION=VALUE...]` (options: SpecPrefillConfig
    fields, e.g. keep_tail=32, chunk=16). `build(llm)` wraps the evaluated model as the target."""

    label: str
    config: SpecPrefillConfig
    draft: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, llm: LLM) -> SpecPrefillTarget:
        dtype = next((k for k, v in DTYPES.items() if v == getattr(llm, "dtype", None)), "float32")
        return SpecPrefillTarget(llm, _draft(self.draft, dtype), self.config, name=self.label)


def parse_spec(spec: str) -> SpecPrefillSpec | None:
    """Parse `specprefill@0.25:draft=smollm2-135m-instruct`; None for specs of other kinds."""
    from longserve.zoo import DEFAULT_MODEL

    head, *options = spec.strip().split(":")
    name, _, keep_text = head.partition("@")
    if name != PREFIX:
        return None
    try:
        keep = float(keep_text) if keep_text else SpecPrefillConfig.keep
    except ValueError:
        raise InvalidParameterError(
            f"bad keep rate in {spec!r}: use a fraction like specprefill@0.25"
        ) from None
    known = {f.name: f.type for f in fields(SpecPrefillConfig)} | {"draft": "str"}
    values: dict[str, Any] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or key not in known or key == "keep":
            raise InvalidParameterError(
                f"bad option {option!r} in {spec!r}; use draft=NAME or one of "
                f"{', '.join(k for k in known if k not in ('keep', 'draft'))}"
            )
        values[key] = value if key in ("draft", "delimiter") else _number(value, spec)
    draft = values.pop("draft", DEFAULT_MODEL)
    try:
        config = SpecPrefillConfig(keep=keep, **values)
    except TypeError as exc:
        raise InvalidParameterError(f"bad option in {spec!r}: {exc}") from None
    return SpecPrefillSpec(spec.strip(), config, draft, values)


def _number(text: str, spec: str) -> Any:
    value = parse_value(text)
    if isinstance(value, str):
        raise InvalidParameterError(f"bad value {text!r} in {spec!r}")
    return value


def register() -> bool:
    """Add `parse_spec` to the eval CLI's spec parsers (`longserve.eval.specs`, which imports nothing of
    specprefill, so there is no import cycle)."""
    register_spec_parser(parse_spec)
    return True


register()
