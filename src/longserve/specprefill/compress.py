"""`SpeculativePrefill`: a small draft picks the prompt tokens a target needs; the target prefills only those.

Two paths, chosen by whether the draft and the target share a tokenizer:

* same tokenizer (e.g. qwen2.5-coder-0.5b for the 1.5b): the target prefills the kept token ids at their
  ORIGINAL position ids (gaps and all), so decoding continues at the original prompt length and RoPE
  phases match the full prompt. With keep=1.0 this is exactly the full-prompt computation.
* cross tokenizer (e.g. smollm2 for a Qwen target, or any remote engine behind the proxy): kept draft
  chunks become character spans of the original text, gaps become a delimiter, and the target tokenizes
  the result itself. The keep rate is then stated in target tokens: the number of kept chunks is searched
  until the target-token ratio of the compressible text is within `tolerance` of `keep`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch

from longserve.errors import InvalidParameterError
from longserve.llm import LLM
from longserve.specprefill import prompt as P
from longserve.specprefill.compressed import (
    CompressedPrompt,
    Prompt,
    encode_for,
    same_tokenizer,
    split_prompt,
    tokenizer_of,
    with_stats,
)
from longserve.specprefill.generation import Generation
from longserve.specprefill.scoring import (
    Importance,
    SpecPrefillConfig,
    chunks_for,
    n_chunks,
    select_tokens,
    token_importance,
)

__all__ = [
    "CompressedPrompt",
    "Prompt",
    "SpeculativePrefill",
    "encode_for",
    "same_tokenizer",
    "split_prompt",
    "with_stats",
]


def _select(
    prompt: Prompt, compress: Sequence[int] | None, roles: Iterable[str] | None
) -> Sequence[int] | None:
    """Message indices that may be compressed: `compress` as given, else those with one of `roles`."""
    if compress is None and roles is not None and isinstance(prompt, list):
        allowed = set(roles)
        return [i for i, m in enumerate(prompt) if m["role"] in allowed]
    return compress


def _passthrough(
    prompt: Prompt, tokens: int, draft_tokens: int, start: float, ids: list[int] | None = None
) -> CompressedPrompt:
    """Nothing worth compressing (shorter than a chunk, or no compressible text): the prompt as it is."""
    return CompressedPrompt(
        prompt,
        tokens,
        tokens,
        "passthrough",
        ids=ids,
        draft_tokens=draft_tokens,
        draft_kept=draft_tokens,
        compress_s=time.perf_counter() - start,
    )


class SpeculativePrefill(Generation):
    """`SpeculativePrefill(draft_llm, SpecPrefillConfig(keep=0.25)).generate(target_llm, prompt)`.

    `compress(target, prompt)` picks the path; `compress_text(prompt, target_tokenizer)` always returns
    text/messages (what a remote engine needs); `compress_context(target, context, question)` compresses
    a context without showing the question to the draft (query-agnostic). Every same-tokenizer entry point
    ends in `_keep_ids`, the text ones in `compress_text`.
    """

    def __init__(self, draft: LLM, config: SpecPrefillConfig | None = None, **overrides):
        self.draft = draft
        config = config or SpecPrefillConfig()
        self.config = replace(config, **overrides) if overrides else config
        self._same: dict[int, tuple[object, bool]] = {}  # id(target tokenizer) -> (it, same as the draft's)

    def shares_tokenizer(self, target: LLM) -> bool:
        """Whether the target reads the draft's token ids (cached: comparing vocabularies is not free)."""
        tok = target.tokenizer
        hit = self._same.get(id(tok))
        if hit is None or hit[0] is not tok:
            hit = self._same[id(tok)] = (tok, same_tokenizer(self.draft.tokenizer, tok))
        return hit[1]

    # ---- scoring -------------------------------------------------------------------------------
    def _cfg(self, keep: float | None = None, **changes) -> SpecPrefillConfig:
        if keep is not None:
            changes["keep"] = keep
        return replace(self.config, **changes) if changes else self.config

    def score(self, ids: list[int], config: SpecPrefillConfig | None = None) -> Importance:
        """Importance of every token of `ids` (draft token ids)."""
        return token_importance(
            self.draft.loaded.model, list(ids), config or self.config, window=self.draft.context_window
        )

    def _keep_ids(
        self,
        prompt: Prompt,
        scored: list[int],
        forced: torch.Tensor,
        cfg: SpecPrefillConfig,
        start: float,
        tail: Sequence[int] = (),
    ) -> CompressedPrompt:
        """The same-tokenizer selection: score `scored`, keep `keep` of its chunks (plus `forced` tokens),
        then all of `tail` (never shown to the draft); kept ids keep their original positions."""
        ids = list(scored) + list(tail)
        t0 = time.perf_counter()
        imp = self.score(scored, cfg)
        score_s = time.perf_counter() - t0
        mask = select_tokens(
            imp.scores, forced, cfg.chunk, chunks_for(cfg.keep, n_chunks(len(scored), cfg.chunk))
        )
        kept = mask.nonzero().flatten().tolist() + list(range(len(scored), len(ids)))
        return CompressedPrompt(
            prompt,
            len(ids),
            len(kept),
            "same_tokenizer",
            ids=[ids[i] for i in kept],
            positions=kept,
            draft_tokens=len(scored),
            draft_kept=int(mask.sum()),
            score_s=score_s,
            compress_s=time.perf_counter() - start,
            windows=imp.windows,
        )

    # ---- compression ---------------------------------------------------------------------------
    def compress(
        self, target: LLM, prompt: Prompt, keep: float | None = None, roles: Iterable[str] | None = None
    ) -> CompressedPrompt:
        """Same-tokenizer path when the draft's ids mean the same text as the target's, else text.
        `roles`: only messages with these roles may be compressed (default: all)."""
        if self.shares_tokenizer(target):
            return self.compress_ids(target, prompt, keep=keep, roles=roles)
        return self.compress_text(prompt, target, keep=keep, roles=roles)

    def compress_ids(
        self,
        target: LLM,
        prompt: Prompt,
        keep: float | None = None,
        compress: Sequence[int] | None = None,
        roles: Iterable[str] | None = None,
    ) -> CompressedPrompt:
        """Kept target ids + their original positions (draft and target must share the tokenizer)."""
        start = time.perf_counter()
        cfg = self._cfg(keep)
        if not self.shares_tokenizer(target):
            raise InvalidParameterError(
                f"draft {self.draft.loaded.name!r} and target {target.loaded.name!r} tokenize differently; "
                "use compress_text() (or compress(), which picks the text path by itself)"
            )
        prompt = P.normalize(prompt)
        r = P.render(target.tokenizer, prompt, _select(prompt, compress, roles))
        ids = encode_for(target, prompt)
        if ids != r.ids:  # rendering disagrees with the target's own encoding: keep its ids, lose offsets
            r = P.Rendered(r.text, ids, None, r.spans, r.messages)
        if len(ids) <= cfg.chunk or P.compressible_tokens(r) == 0:
            return _passthrough(prompt, len(ids), len(ids), start, ids=ids)
        forced = P.forced_mask(r, target.tokenizer, cfg.keep_special, cfg.keep_tail)
        return self._keep_ids(prompt, ids, forced, cfg, start)

    def compress_token_ids(
        self, target: LLM, ids: Sequence[int], keep: float | None = None
    ) -> CompressedPrompt:
        """Same-tokenizer path from token ids alone (e.g. a server that already tokenized the prompt):
        special tokens, the last token and the last `keep_tail` tokens are forced."""
        start = time.perf_counter()
        cfg = self._cfg(keep)
        ids = list(ids)
        if not ids:
            raise InvalidParameterError("the prompt is empty")
        if not self.shares_tokenizer(target):
            raise InvalidParameterError(
                "token ids can only be compressed by a draft that shares the target's tokenizer"
            )
        if len(ids) <= cfg.chunk:
            return _passthrough(ids, len(ids), len(ids), start, ids=ids)
        r = P.Rendered("", ids, None, [P.Span(0, 0, -1, True)])
        forced = P.forced_mask(r, target.tokenizer, cfg.keep_special, cfg.keep_tail)
        return self._keep_ids(ids, ids, forced, cfg, start)

    def compress_for_engine(
        self, target: LLM, prompt: Prompt | Sequence[int], keep: float | None = None
    ) -> CompressedPrompt:
        """Like `compress`, but `ids` is always set (the ids to submit; `positions` too on the same-tokenizer
        path): what a server that feeds its own engine needs. Token-id prompts need a same-tokenizer draft."""
        if isinstance(prompt, list | tuple) and prompt and isinstance(prompt[0], int):
            return self.compress_token_ids(target, prompt, keep=keep)
        cp = self.compress(target, prompt, keep=keep)
        if cp.ids is None:
            cp.ids = encode_for(target, cp.prompt)
        return cp

    def compress_text(
        self,
        prompt: Prompt,
        target_tokenizer=None,
        keep: float | None = None,
        compress: Sequence[int] | None = None,
        roles: Iterable[str] | None = None,
        config: SpecPrefillConfig | None = None,
    ) -> CompressedPrompt:
        """Compressed text (or messages with compressed contents) for any target.

        `target_tokenizer` (a tokenizer or an LLM; default: the draft's) is what the keep rate is measured
        in. `compress` (message indices) or `roles` restrict which message contents may be compressed;
        everything else, the chat template and the last `keep_tail` draft tokens are kept verbatim.
        """
        start = time.perf_counter()
        cfg = replace(config or self.config, **({"keep": keep} if keep is not None else {}))
        tok = self.draft.tokenizer
        target_tok = tokenizer_of(target_tokenizer) if target_tokenizer is not None else tok
        prompt = P.normalize(prompt)
        r = P.render(tok, prompt, _select(prompt, compress, roles))
        if not r.has_offsets:
            raise InvalidParameterError(
                f"the draft {self.draft.loaded.name!r} has no offset mapping (not a fast HF tokenizer); "
                "the text path needs one"
            )
        original = P.count_tokens(target_tok, prompt)
        n = len(r.ids)
        if n <= cfg.chunk or P.compressible_tokens(r) == 0:
            return _passthrough(prompt, original, n, start)
        t0 = time.perf_counter()
        imp = self.score(r.ids, cfg)
        score_s = time.perf_counter() - t0
        forced = P.forced_mask(r, tok, cfg.keep_special, cfg.keep_tail)
        new_prompt, mask, content_ratio, ok = self._fit(r, imp, forced, target_tok, cfg)
        kept = P.count_tokens(target_tok, new_prompt)
        return CompressedPrompt(
            new_prompt,
            original,
            kept,
            "cross_tokenizer",
            draft_tokens=n,
            draft_kept=int(mask.sum()),
            content_ratio=content_ratio,
            within_tolerance=ok,
            score_s=score_s,
            compress_s=time.perf_counter() - start,
            windows=imp.windows,
        )

    def _fit(
        self, r: P.Rendered, imp: Importance, forced: torch.Tensor, target_tok, cfg: SpecPrefillConfig
    ) -> tuple[Prompt, torch.Tensor, float, bool]:
        """Binary search on the number of kept chunks until the compressible text keeps `keep` of its
        target tokens (within `tolerance`); the closest attempt wins otherwise."""
        spans = [s for s in r.spans if s.compressible]
        original = P.content_tokens(target_tok, [r.text[s.start : s.end] for s in spans])
        total = n_chunks(len(r.ids), cfg.chunk)
        best = None
        lo, hi = (total, total) if cfg.keep >= 1 else (0, total)
        while lo <= hi:
            mid = (lo + hi) // 2
            mask = select_tokens(imp.scores, forced, cfg.chunk, mid)
            texts = P.rebuild(r, mask, cfg.delimiter, cfg.word_reach)
            ratio = P.content_tokens(target_tok, [texts[s.message] for s in spans]) / max(1, original)
            error = abs(ratio - cfg.keep)
            if best is None or error < best[0]:
                best = (error, texts, mask, ratio)
            if error <= cfg.tolerance * cfg.keep:
                break
            if ratio < cfg.keep:
                lo = mid + 1
            else:
                hi = mid - 1
        error, texts, mask, ratio = best
        return P.apply(r, texts), mask, ratio, error <= cfg.tolerance * cfg.keep

    def compress_context(
        self, target: LLM, context: str, question: str, keep: float | None = None
    ) -> CompressedPrompt:
        """Query-agnostic: the draft scores `context` alone; `question` is appended uncompressed."""
        start = time.perf_counter()
        cfg = self._cfg(keep, keep_tail=0)
        if not context:
            raise InvalidParameterError("the context is empty")
        chat = bool(getattr(target.tokenizer, "chat_template", None))
        full: Prompt = [{"role": "user", "content": context + question}] if chat else context + question
        if self.shares_tokenizer(target):
            head, tail = split_prompt(target.tokenizer, context, question)
            if len(head) <= cfg.chunk:
                return _passthrough(full, len(head) + len(tail), len(head), start, ids=head + tail)
            specials = P.special_ids(target.tokenizer) if cfg.keep_special else set()
            forced = torch.tensor([t in specials for t in head], dtype=torch.bool)
            forced[-1] = not tail or bool(forced[-1])  # without a question, the last token must stay
            return self._keep_ids(full, head, forced, cfg, start, tail=tail)
        part = self.compress_text(
            [{"role": "user", "content": context}] if chat else context, target, config=cfg
        )
        new_context = part.prompt[0]["content"] if chat else part.prompt
        new: Prompt = (
            [{"role": "user", "content": new_context + question}] if chat else new_context + question
        )
        original = P.count_tokens(target.tokenizer, full)
        return replace(
            part,
            prompt=new,
            original_tokens=original,
            kept_tokens=P.count_tokens(target.tokenizer, new),
            compress_s=time.perf_counter() - start,
        )
