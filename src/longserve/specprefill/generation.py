"""Decoding on the target after speculative prefill: the generation half of `SpeculativePrefill`.

A mixin so `SpeculativePrefill` stays one object for its callers while compression (compress.py) and
generation live in files of their own; it needs only `compress(target, prompt, keep=...)` from the class.
"""

from __future__ import annotations

from collections.abc import Iterator

from longserve.engine.engine import StepOutput
from longserve.engine.sampler import SamplingParams
from longserve.errors import ContextLengthError
from longserve.llm import LLM, Completion
from longserve.specprefill.compressed import CompressedPrompt, Prompt, encode_for, with_stats


class Generation:
    """`generate`, `generate_compressed` and `stream` on top of the class's `compress`."""

    def compress(self, target: LLM, prompt: Prompt, keep: float | None = None) -> CompressedPrompt:
        raise NotImplementedError

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
        requests = [self.request_ids(target, cp, max_new_tokens) for cp in compressed]
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
        ids, positions = self.request_ids(target, cp, max_new_tokens)
        engine = target.engine(1, policy.capacity(len(ids), max_new_tokens))
        seq = engine.add_request(ids, params, policy, positions=positions)
        seq.spec_prefill = cp
        while engine.has_unfinished():
            yield from engine.step()

    def request_ids(
        self, target: LLM, cp: CompressedPrompt, max_new_tokens: int
    ) -> tuple[list[int], list[int] | None]:
        """(ids, original positions or None) to submit for `cp`; positions must leave room for the answer."""
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
