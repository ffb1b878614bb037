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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from longserve.engine.engine import StepOutput
from longserve.engine.sampler import SamplingParams
from longserve.errors import ContextLengthError, InvalidParameterError
from longserve.llm import LLM, Completion
from longserve.specprefill import prompt as P
from longserve.specprefill.scoring import (
    Importance,
    SpecPrefillConfig,
    chunks_for,
    n_chunks,
    select_tokens,
    token_importance,
)

Prompt = P.Prompt
_SPLIT = "\u2063LONGSERVE_SPLIT\u2063"


@dataclass
class CompressedPrompt:
    """What the target gets: `prompt` (text or messages) for the cross-tokenizer path; `ids` + `positions`
    (original position ids of the kept tokens) for the same-tokenizer path. Token counts are the target's."""

    prompt: Prompt
    original_tokens: int
    kept_tokens: int
    path: str  # "same_tokenizer", "cross_tokenizer" or "passthrough"
    ids: list[int] | None = None
    positions: list[int] | None = None
    draft_tokens: int = 0
    draft_kept: int = 0
    content_ratio: float | None = None  # cross path: kept / original target tokens of the compressible text
    within_tolerance: bool = True
    score_s: float = 0.0  # draft forward (prefill + look-ahead)
    compress_s: float = 0.0  # everything: rendering, scoring, selection, re-tokenization
    windows: int = 0

    @property
    def ratio(self) -> float:
        return self.kept_tokens / max(1, self.original_tokens)

    @property
    def text(self) -> str | None:
        return self.prompt if isinstance(self.prompt, str) else None

    @property
    def messages(self) -> list[dict] | None:
        return self.prompt if isinstance(self.prompt, list) else None

    def stats(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("prompt", "ids", "positions")}
        out["ratio"] = self.ratio
        return out


def _tokenizer_of(x):
    return x.tokenizer if isinstance(x, LLM) else x


def same_tokenizer(a, b) -> bool:
    """Whether token ids mean the same text under both tokenizers (vocab + a probe encoding)."""
    if a is b:
        return True
    get_a, get_b = getattr(a, "get_vocab", None), getattr(b, "get_vocab", None)
    if callable(get_a) and callable(get_b):
        if get_a() != get_b():
            return False
    elif type(a) is not type(b):
        return False
    probe = "Hello, world! 12345 <tag> naïve\n\tdef f(x): return x"
    return list(a.encode(probe, add_special_tokens=True)) == list(b.encode(probe, add_special_tokens=True))


def _select(
    prompt: Prompt, compress: Sequence[int] | None, roles: Iterable[str] | None
) -> Sequence[int] | None:
    if compress is None and roles is not None and isinstance(prompt, list):
        allowed = set(roles)
        return [i for i, m in enumerate(prompt) if m["role"] in allowed]
    return compress


def encode_for(target: LLM, prompt: Prompt) -> list[int]:
    """Token ids the target runs for `prompt` (template-less models get the server's plain chat format)."""
    if isinstance(prompt, list) and not getattr(target.tokenizer, "chat_template", None):
        return list(target.tokenizer.encode(P.plain_chat(prompt), add_special_tokens=True))
    return target.encode(prompt)


def split_prompt(tokenizer, context: str, question: str) -> tuple[list[int], list[int]]:
    """Ids of (everything up to the end of `context`, the rest) for a prompt reading `context + question`:
    one user turn with a chat template, raw text without one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + _SPLIT + question}],
            add_generation_prompt=True,
            tokenize=False,
        )
        add_special = False
    else:
        text, add_special = context + _SPLIT + question, True
    head, tail = text.split(_SPLIT)
    return (
        list(tokenizer.encode(head, add_special_tokens=add_special)),
        list(tokenizer.encode(tail, add_special_tokens=False)),
    )


class SpeculativePrefill:
    """`SpeculativePrefill(draft_llm, SpecPrefillConfig(keep=0.25)).generate(target_llm, prompt)`.

    `compress(target, prompt)` picks the path; `compress_text(prompt, target_tokenizer)` always returns
    text/messages (what a remote engine needs); `compress_context(target, context, question)` compresses
    a context without showing the question to the draft (query-agnostic).
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
        compress = _select(prompt, compress, roles)
        r = P.render(target.tokenizer, prompt, compress)
        ids = encode_for(target, prompt)
        if ids != r.ids:  # rendering disagrees with the target's own encoding: keep its ids, lose offsets
            r = P.Rendered(r.text, ids, None, r.spans, r.messages)
        n = len(ids)
        if n <= cfg.chunk or P.compressible_tokens(r) == 0:
            return CompressedPrompt(
                prompt,
                n,
                n,
                "passthrough",
                ids=ids,
                draft_tokens=n,
                draft_kept=n,
                compress_s=time.perf_counter() - start,
            )
        t0 = time.perf_counter()
        imp = self.score(ids, cfg)
        score_s = time.perf_counter() - t0
        forced = P.forced_mask(r, target.tokenizer, cfg.keep_special, cfg.keep_tail)
        mask = select_tokens(imp.scores, forced, cfg.chunk, chunks_for(cfg.keep, n_chunks(n, cfg.chunk)))
        kept = mask.nonzero().flatten().tolist()
        return CompressedPrompt(
            prompt,
            n,
            len(kept),
            "same_tokenizer",
            ids=[ids[i] for i in kept],
            positions=kept,
            draft_tokens=n,
            draft_kept=len(kept),
            score_s=score_s,
            compress_s=time.perf_counter() - start,
            windows=imp.windows,
        )

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
        n = len(ids)
        if n <= cfg.chunk:
            return CompressedPrompt(
                ids,
                n,
                n,
                "passthrough",
                ids=ids,
                draft_tokens=n,
                draft_kept=n,
                compress_s=time.perf_counter() - start,
            )
        t0 = time.perf_counter()
        imp = self.score(ids, cfg)
        score_s = time.perf_counter() - t0
        r = P.Rendered("", ids, None, [P.Span(0, 0, -1, True)])
        forced = P.forced_mask(r, target.tokenizer, cfg.keep_special, cfg.keep_tail)
        mask = select_tokens(imp.scores, forced, cfg.chunk, chunks_for(cfg.keep, n_chunks(n, cfg.chunk)))
        kept = mask.nonzero().flatten().tolist()
        return CompressedPrompt(
            ids,
            n,
            len(kept),
            "same_tokenizer",
            ids=[ids[i] for i in kept],
            positions=kept,
            draft_tokens=n,
            draft_kept=len(kept),
            score_s=score_s,
            compress_s=time.perf_counter() - start,
            windows=imp.windows,
        )

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
        target_tok = _tokenizer_of(target_tokenizer) if target_tokenizer is not None else tok
        prompt = P.normalize(prompt)
        compress = _select(prompt, compress, roles)
        r = P.render(tok, prompt, compress)
        if not r.has_offsets:
            raise InvalidParameterError(
                f"the draft {self.draft.loaded.name!r} has no offset mapping (not a fast HF tokenizer); "
                "the text path needs one"
            )
        original = P.count_tokens(target_tok, prompt)
        n = len(r.ids)
        if n <= cfg.chunk or P.compressible_tokens(r) == 0:
            return CompressedPrompt(
                prompt,
                original,
                original,
                "passthrough",
                draft_tokens=n,
                draft_kept=n,
                compress_s=time.perf_counter() - start,
            )
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
            n = len(head) + len(tail)
            if len(head) <= cfg.chunk:
                return CompressedPrompt(
                    full,
                    n,
                    n,
                    "passthrough",
                    ids=head + tail,
                    draft_tokens=len(head),
                    draft_kept=len(head),
                    compress_s=time.perf_counter() - start,
                )
            t0 = time.perf_counter()
            imp = self.score(head, cfg)
            score_s = time.perf_counter() - t0
            specials = P.special_ids(target.tokenizer) if cfg.keep_special else set()
            forced = torch.tensor([t in specials for t in head], dtype=torch.bool)
            forced[-1] = not tail or bool(forced[-1])  # without a question, the last token must stay
            mask = select_tokens(
                imp.scores, forced, cfg.chunk, chunks_for(cfg.keep, n_chunks(len(head), cfg.chunk))
            )
            kept = mask.nonzero().flatten().tolist() + list(range(len(head), n))
            ids = head + tail
            return CompressedPrompt(
                full,
                n,
                len(kept),
                "same_tokenizer",
                ids=[ids[i] for i in kept],
                positions=kept,
                draft_tokens=len(head),
                draft_kept=int(mask.sum()),
                score_s=score_s,
                compress_s=time.perf_counter() - start,
                windows=imp.windows,
            )
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

    # ---- generation ----------------------------------------------------------------------------
    def generate(
        self,
        target: LLM,
        prompts: Prompt | list[Prompt],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
        keep: float | None = None,
        kv_policy=None,
        kv_budget: int | None = None,
        kv_ratio: float | None = None,
        **policy_kwargs,
    ) -> list[Completion]:
        """Compress each prompt, then decode them together on the target (any KV policy still applies).
        `stats["ttft_s"]` includes the compression; `stats["target_ttft_s"]` is the target's alone."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            return []
        compressed = [self.compress(target, p, keep=keep) for p in batch]
        return self.generate_compressed(
            target,
            compressed,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            kv_policy,
            kv_budget,
            kv_ratio,
            **policy_kwargs,
        )

    def generate_compressed(
        self,
        target: LLM,
        compressed: list[CompressedPrompt],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
        kv_policy=None,
        kv_budget: int | None = None,
        kv_ratio: float | None = None,
        **policy_kwargs,
    ) -> list[Completion]:
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, list(stop or []))
        policy = target.policy(kv_policy, kv_budget, kv_ratio, **policy_kwargs)
        requests = [self._request(target, cp, max_new_tokens) for cp in compressed]
        capacity = max(policy.capacity(len(ids), max_new_tokens) for ids, _ in requests)
        engine = target.engine(min(len(requests), target.max_batch_size), capacity)
        seqs = [engine.add_request(ids, params, policy, positions=pos) for ids, pos in requests]
        while engine.has_unfinished():
            engine.step()
        return [
            Completion(s.text, s.output_ids, s.prompt_len, s.finish_reason, with_stats(s.stats(), cp))
            for s, cp in zip(seqs, compressed, strict=True)
        ]

    def stream(
        self,
        target: LLM,
        prompt: Prompt,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
        keep: float | None = None,
        kv_policy=None,
        kv_budget: int | None = None,
        kv_ratio: float | None = None,
        **policy_kwargs,
    ) -> Iterator[StepOutput]:
        """Yield text pieces; every output's `seq.spec_prefill` holds the compression stats (for the CLI:
        `with_stats(out.seq.stats(), out.seq.spec_prefill)`)."""
        cp = self.compress(target, prompt, keep=keep)
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, list(stop or []))
        policy = target.policy(kv_policy, kv_budget, kv_ratio, **policy_kwargs)
        ids, positions = self._request(target, cp, max_new_tokens)
        engine = target.engine(1, policy.capacity(len(ids), max_new_tokens))
        seq = engine.add_request(ids, params, policy, positions=positions)
        seq.spec_prefill = cp
        while engine.has_unfinished():
            yield from engine.step()

    def _request(
        self, target: LLM, cp: CompressedPrompt, max_new_tokens: int
    ) -> tuple[list[int], list[int] | None]:
        if cp.ids is not None:
            ids, positions = cp.ids, cp.positions
        else:
            ids, positions = encode_for(target, cp.prompt), None
        end = positions[-1] + 1 if positions else len(ids)
        if end + max_new_tokens > target.context_window:
            raise ContextLengthError(
                f"the original prompt ({end} positions) + max_new_tokens ({max_new_tokens}) exceed the target's "
                f"context window of {target.context_window} tokens: speculative prefill keeps original positions"
            )
        return ids, positions


def with_stats(stats: dict, cp: CompressedPrompt) -> dict:
    """A target sequence's stats with the compression's: `ttft_s` becomes end-to-end (compression included)."""
    out = dict(stats)
    out["target_ttft_s"] = stats.get("ttft_s")
    if stats.get("ttft_s") is not None:
        out["ttft_s"] = stats["ttft_s"] + cp.compress_s
    out["spec_prefill"] = cp.stats()
    return out
