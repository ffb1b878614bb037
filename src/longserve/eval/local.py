"""The local engine as an evaluation `Target`: one `LLM`, one KV policy (and budget) per target.

Both settings see the same user turn, `context + question` (through the chat template when the model has
one, as raw text otherwise or for LongBench's few-shot/completion tasks):

* "query_aware": the whole prompt is prefilled and compressed at once (the question is visible to the
  policy); requests are decoded together in batches through `LLM.generate`.
* "query_agnostic": the prompt is split where the context ends, the context is compressed on its own
  (`LLM.compress`, as for a document cached before any question is known), then the rest of the turn is
  prefilled on top of the compressed cache and answered (`LLM.stream(..., prefix=ctx)`), one request at a
  time. Splitting costs at most a token or two at the seam compared with "query_aware".

Greedy decoding throughout, so results are deterministic.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from longserve.errors import InvalidParameterError
from longserve.eval.target import SETTINGS, EvalRequest, EvalResult
from longserve.llm import LLM, Completion


def policy_label(kv_policy: str = "full", kv_budget: int | None = None, kv_ratio: float | None = None) -> str:
    """The target label the reports parse: "full", "snapkv@256", "snapkv@r0.25" (a ratio, not a budget)."""
    if kv_budget is not None:
        return f"{kv_policy}@{kv_budget}"
    if kv_ratio is not None:
        return f"{kv_policy}@r{kv_ratio:g}"
    return kv_policy


class LocalTarget:
    """Evaluate `llm` under one KV policy. `name` defaults to `policy_label(...)`; extra keyword arguments
    (`window=`, `n_sink=`...) go to the policy, as in `LLM.generate`."""

    def __init__(
        self,
        llm: LLM,
        kv_policy: str = "full",
        kv_budget: int | None = None,
        kv_ratio: float | None = None,
        name: str | None = None,
        **policy_kwargs: Any,
    ):
        self.llm = llm
        self.kv_policy, self.kv_budget, self.kv_ratio = kv_policy, kv_budget, kv_ratio
        self.policy_kwargs = policy_kwargs
        self.name = name or policy_label(kv_policy, kv_budget, kv_ratio)
        llm.policy(**self._policy_args())  # unknown policy or bad parameter: fail now, not mid-run

    def _policy_args(self) -> dict[str, Any]:
        return {
            "kv_policy": self.kv_policy,
            "kv_budget": self.kv_budget,
            "kv_ratio": self.kv_ratio,
            **self.policy_kwargs,
        }

    # ---- Target protocol -------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenizer.encode(text, add_special_tokens=False))

    def answer(self, requests: list[EvalRequest]) -> list[EvalResult]:
        results: list[EvalResult | None] = [None] * len(requests)
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            if r.setting not in SETTINGS:
                raise InvalidParameterError(
                    f"unknown setting {r.setting!r}; choose from {', '.join(SETTINGS)}"
                )
            if r.setting == "query_agnostic":
                results[i] = self._agnostic(r)
            else:  # one generate() call per (max_new_tokens, raw) group keeps the batch homogeneous
                groups[r.max_new_tokens, self._raw(r)].append(i)
        for (max_new_tokens, raw), idx in groups.items():
            prompts = [self._prompt(requests[i], raw) for i in idx]
            started = time.perf_counter()
            completions = self.llm.generate(
                prompts, max_new_tokens=max_new_tokens, temperature=0.0, **self._policy_args()
            )
            wall = time.perf_counter() - started
            for i, c in zip(idx, completions, strict=True):
                results[i] = self._result(c, c.prompt_tokens, "query_aware", batch=len(idx), wall_s=wall)
        return [r for r in results if r is not None]

    # ---- prompts ---------------------------------------------------------------------------------
    def _raw(self, request: EvalRequest) -> bool:
        return request.raw_prompt or not self.llm.tokenizer.chat_template

    def _prompt(self, request: EvalRequest, raw: bool) -> str | list[dict]:
        text = request.context + request.question
        return text if raw else [{"role": "user", "content": text}]

    def split_ids(self, request: EvalRequest) -> tuple[list[int], list[int]]:
        """Token ids of the prompt up to the end of the context, and of the rest of it (question, the
        turn's end and the generation prompt); their concatenation is the "query_aware" prompt."""
        if self._raw(request):
            tok = self.llm.tokenizer
            return (
                tok.encode(request.context, add_special_tokens=True),
                tok.encode(request.question, add_special_tokens=False),
            )
        return self.llm.split_chat(request.context, request.question, sep="")

    # ---- query-agnostic --------------------------------------------------------------------------
    def _agnostic(self, request: EvalRequest) -> EvalResult:
        head, tail = self.split_ids(request)
        started = time.perf_counter()
        ctx = self.llm.compress(head, **self._policy_args())
        compress_s = time.perf_counter() - started
        last = None
        for out in self.llm.stream(tail, max_new_tokens=request.max_new_tokens, temperature=0.0, prefix=ctx):
            last = out
        seq = last.seq
        completion = Completion(seq.text, seq.output_ids, seq.prompt_len, seq.finish_reason, seq.stats())
        return self._result(
            completion,
            len(head) + len(tail),
            "query_agnostic",
            batch=1,
            wall_s=time.perf_counter() - started,
            compress_s=compress_s,
            compressed_context_bytes=ctx.nbytes,
            compressed_context_tokens=ctx.fill,
            context_tokens=len(head),
        )

    # ---- results ---------------------------------------------------------------------------------
    def _result(self, c: Completion, prompt_tokens: int, setting: str, **extra: Any) -> EvalResult:
        stats = c.stats
        kv_tokens = stats.get("kv_tokens_final")
        ttft = float(stats.get("ttft_s") or 0.0)
        if "compress_s" in extra:  # first-token latency of the sample as evaluated: compression + answer
            extra["answer_ttft_s"] = ttft
            ttft += extra["compress_s"]
        return EvalResult(
            text=c.text,
            prompt_tokens=prompt_tokens,
            ttft_s=ttft,
            decode_tok_s=float(stats.get("decode_tokens_per_s") or 0.0),
            kv_bytes=int(stats.get("kv_bytes_peak") or 0),
            extra={
                "setting": setting,
                "kv_policy": self.kv_policy,
                "kv_budget": self.kv_budget,
                "kv_ratio": self.kv_ratio,
                "completion_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
                "kv_tokens_final": kv_tokens,
                "kv_bytes_final": stats.get("kv_bytes_final"),
                "kv_bytes_allocated": stats.get("kv_bytes_allocated"),
                # whole prompt + answer over what the cache held at the end (the engine's own ratio would
                # count only the question part of a query-agnostic prompt)
                "compression_ratio": (prompt_tokens + len(c.token_ids)) / max(1, kv_tokens or 0),
                **extra,
            },
        )
