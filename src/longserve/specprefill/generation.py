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
        sampling: SamplingParams | None = None,
        kv_policy=None,
        keep: float | None = None,
        **options,
    ) -> list[Completion]:
        """Compress each prompt, then decode them together on the target (any KV policy still applies).
        `options` as in `LLM.request()`. `stats["ttft_s"]` includes the compression;
        `stats["target_ttft_s"]` is the target's alone."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            return []
        compressed = [self.compress(target, p, keep=keep) for p in batch]
        return self.generate_compressed(target, compressed, sampling, kv_policy, **options)

    def generate_compressed(
        self,
        target: LLM,
        compressed: list[CompressedPrompt],
        sampling: SamplingParams | None = None,
        kv_policy=None,
        **options,
    ) -> list[Completion]:
        params, policy = target.request(sampling, kv_policy, **options)
        requests = [self.request_ids(target, cp, params.max_new_tokens) for cp in compressed]
        capacity = max(policy.capacity(len(ids), params.max_new_tokens) for ids, _ in requests)
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
        sampling: SamplingParams | None = None,
        kv_policy=None,
        keep: float | None = None,
        **options,
    ) -> Iterator[StepOutput]:
        """Yield text pieces; every output's `seq.spec_prefill` holds the compression stats (for the CLI:
        `with_stats(out.seq.stats(), out.seq.spec_prefill)`)."""
        cp = self.compress(target, prompt, keep=keep)
        params, policy = target.request(sampling, kv_policy, **options)
        ids, positions = self.request_ids(target, cp, params.max_new_tokens)
        engine = target.engine(1, policy.capacity(len(ids), params.max_new_tokens))
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
