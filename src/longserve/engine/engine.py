"""The engine loop: request -> scheduler -> model runner (KV pool + policy) -> sampler -> output.

Offline generation (`LLM.generate`) and the HTTP server drive the same `step()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from longserve.context import CompressedContext
from longserve.engine.compiled_decode import StepCompiler
from longserve.engine.model_runner import ModelRunner
from longserve.engine.prefix_cache import CachePrefix, PrefixCache
from longserve.engine.sampler import SamplingParams, sample
from longserve.engine.scheduler import Scheduler, Step
from longserve.engine.sequence import Sequence
from longserve.errors import ContextLengthError, InvalidParameterError
from longserve.kv.cache import KVPool
from longserve.kv.policies import Policy
from longserve.loader import LoadedModel


@dataclass(frozen=True)
class _PrefixShape:
    """The sizes `check` reads from a prefix, for one not made yet."""

    next_pos: int
    fill: int


@dataclass
class StepOutput:
    seq: Sequence
    new_text: str
    finished: bool


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        n_slots: int,
        capacity: int,
        max_tokens: int | None = None,
        prefill_chunk: int = 2048,
        dtype: torch.dtype = torch.float32,
        max_step_tokens: int | None = None,
        prefix_cache: PrefixCache | None = None,
        device: torch.device | str | None = None,
        compiler: StepCompiler | None = None,
        layer_shift: tuple[int, ...] | None = None,
    ):
        """`device`: where the KV pool and every step tensor live (default: the model's weights').
        `compiler`: compiled decode steps (`LLM(compile=True)`) for the plans `compiled_decode.eligible`
        accepts (ring and append policies), shared by the engines of one model."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        device = device if device is not None else next(loaded.model.parameters()).device
        self.pool = KVPool(loaded.args, n_slots, capacity, max_tokens, dtype, device, layer_shift=layer_shift)
        self.runner = ModelRunner(loaded.model, self.pool, compiler, tokenizer=loaded.tokenizer)
        self.scheduler = Scheduler(self.pool, prefill_chunk=prefill_chunk, max_step_tokens=max_step_tokens)
        self.sequences: dict[str, Sequence] = {}
        self.prefix_cache = prefix_cache
        self.last_step = None  # what the latest step() ran (the server fails exactly those on errors)
        self.carried: list[StepOutput] = []  # outputs made before a step failed, returned by the next

    # ---- requests ------------------------------------------------------------------------------
    def check(
        self,
        prompt_len: int,
        params: SamplingParams,
        policy: Policy,
        prefix=None,
        positions: list[int] | None = None,
    ) -> None:
        window = self.loaded.context_window
        offset = prefix.next_pos if prefix is not None else 0
        if positions:  # a pruned prompt still decodes at its original length
            offset += positions[-1] + 1 - prompt_len
        if prompt_len == 0:
            raise InvalidParameterError("the prompt is empty")
        if offset + prompt_len + params.max_new_tokens > window:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) exceed the model's "
                f"context window of {window} tokens; shorten the prompt or lower max_new_tokens"
            )
        need = policy.capacity(prompt_len, params.max_new_tokens) + (prefix.fill if prefix is not None else 0)
        if need > self.pool.capacity:
            raise ContextLengthError(
                f"this request needs {need} KV entries per layer under policy '{policy.name}' but each KV "
                f"slot holds {self.pool.capacity} (slots are sized once, for the server's default policy "
                f"and budget); send a policy whose budget fits, e.g. "
                f'{{"name": "snapstream", "budget": {self.pool.capacity}}}, or restart the server with '
                f"a larger --kv-budget (or --kv-policy full, whose slots hold --max-model-len)"
            )

    def check_cache_prefix(
        self, prompt_len: int, params: SamplingParams, policy: Policy, spec: CachePrefix
    ) -> None:
        """`check` for a request whose first `spec.n_tokens` become a compressed prefix, before it is
        compressed: the prefix holds what the policy keeps of it, the rest runs under `policy`."""
        if not 0 < spec.n_tokens < prompt_len:
            raise InvalidParameterError(
                f"cache_prefix covers {spec.n_tokens} of the prompt's {prompt_len} tokens; it must leave at least one"
            )
        shape = _PrefixShape(next_pos=spec.n_tokens, fill=spec.policy.max_kept(spec.n_tokens))
        self.check(prompt_len - spec.n_tokens, params, policy, prefix=shape)

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        policy: Policy,
        request_id: str = "",
        positions: list[int] | None = None,
        prefix=None,
        cache_prefix: CachePrefix | None = None,
    ) -> Sequence:
        """Queue a request. `prefix`: a compressed context the prompt continues; `cache_prefix`: the
        first tokens of the prompt become (or reuse) a cached compressed prefix."""
        prompt_ids, cached, hit, arrival = list(prompt_ids), 0, False, time.perf_counter()
        if cache_prefix is not None:
            if prefix is not None or positions is not None:
                raise InvalidParameterError(
                    "cache_prefix cannot be combined with a given prefix or positions"
                )
            self.check_cache_prefix(len(prompt_ids), params, policy, cache_prefix)  # before compressing
            prefix, hit = self.compressed_prefix(prompt_ids, cache_prefix)
            cached, prompt_ids = cache_prefix.n_tokens, prompt_ids[cache_prefix.n_tokens :]
        seq = Sequence(
            prompt_ids, params, policy, request_id=request_id, prompt_positions=positions, prefix=prefix
        )
        seq.prefix_tokens, seq.cached_tokens = cached, cached if hit else 0
        seq.arrival = arrival  # TTFT includes compressing a new prefix
        if self.caches(policy) and positions is None and prefix is None:
            seq.cache_ids = (
                seq.prompt_ids
            )  # looked up when its prefill starts (earlier prompts are in by then)
        return self.add_sequence(seq)

    def compressed_prefix(self, ids: list[int], spec: CachePrefix) -> tuple[CompressedContext, bool]:
        """(the cached compressed KV of `ids[:spec.n_tokens]` under `spec.policy`, whether it was cached).
        A miss compresses the prefix now, in a one-slot engine of its own over the same model (running
        slots are untouched), and caches it: the first request pays the prefix's prefill in one go.
        `add_request` checks the request (`check_cache_prefix`) before calling this."""
        if self.prefix_cache is None:
            raise InvalidParameterError(
                "cache_prefix needs a prefix cache: LLM(..., prefix_cache='1GiB') or --prefix-cache-memory"
            )
        n = spec.n_tokens
        key = self.prefix_cache.compressed_key(ids[:n], spec.policy)
        ctx = self.prefix_cache.get_compressed(key)
        if ctx is not None:
            return ctx, True
        engine = LLMEngine(
            self.loaded,
            1,
            spec.policy.capacity(n, 1),
            max_tokens=self.loaded.context_window,
            prefill_chunk=self.scheduler.prefill_chunk,
            dtype=self.pool.dtype,
            device=self.pool.device,
        )
        seq = engine.add_request(ids[:n], SamplingParams(max_new_tokens=1), spec.policy)
        engine.prefill(seq)
        fingerprint = self.prefix_cache.fingerprint
        ctx = CompressedContext.from_slot(engine.pool, seq.slot, fingerprint, spec.policy.describe(), n)
        engine.abort(seq.request_id)
        self.prefix_cache.put_compressed(key, ctx)
        return ctx, False

    def caches(self, policy: Policy) -> bool:
        """Prefix caching covers models without sliding-window layers (see prefix_cache), under `full`
        and under policies that compress at prefill (their staged, uncompressed prefix is cached);
        not Quest, whose page bounds are built from the slot, head-adaptive slots, nor policies with a
        scoring pass (KVzip scores the whole prompt in one pass over it)."""
        return (
            self.prefix_cache is not None
            and (policy.name == "full" or policy.compresses)
            and not policy.sparse_decode
            and not policy.head_adaptive
            and not policy.has_scoring_pass
            and not any(self.loaded.args.layer_windows)
        )

    def add_sequence(self, seq: Sequence) -> Sequence:
        """Queue a sequence built by the caller (a `Sequence` subclass that carries extra stats)."""
        self.check(seq.prompt_len, seq.params, seq.policy, seq.prefix, seq.prompt_positions)
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        """Cancel a request at any point; its KV slot is freed at once."""
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            seq.finish_reason = "abort"
            self._finish(seq)

    def has_unfinished(self) -> bool:
        return bool(self.carried) or self.scheduler.has_work()

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        self.last_step = None  # set before running, so a failing step() names exactly what it ran
        if self.carried:  # first tokens of a prefill step that then failed on a later sequence
            carried, self.carried = self.carried, []
            return carried
        step = self.last_step = self.scheduler.schedule()
        if step is None:
            return []
        if step.kind == "prefill":
            return self._prefill_step(step)
        seqs = sorted(step.seqs, key=lambda s: s.slot)  # contiguous slots let attention read in place
        return self.emit(seqs, self.runner.decode(seqs))

    def _prefill_step(self, step: Step) -> list[StepOutput]:
        """Prefill chunks of the step's sequences until its token budget is spent, packed into one
        forward (`ModelRunner.prefill_packed`). A cached prefix is looked up as a sequence's prefill
        starts; when a prompt begins like one in the pack that found nothing cached, the pack runs first
        so that prompt finds what it inserts (eight prompts on one new document: the first runs alone,
        a miss; the seven others hit and run together)."""
        self.carried, budget, pack = [], step.n_tokens, []
        for seq in step.seqs:
            if budget <= 0:
                break
            if seq.prefilled == 0 and seq.cache_ids is not None:
                if any(self._would_seed(other, seq) for other, _ in pack):
                    self._run_pack(pack, step)
                    pack = []
                self._attach_cached_prefix(seq)
            n_tokens = self.scheduler.chunk(seq, budget)
            budget -= n_tokens
            if (
                seq.cache_ids is not None
                and seq.policy.compresses
                and seq.prefilled + n_tokens == seq.prompt_len
            ):
                self._cache_staged(seq)  # the uncompressed prefix, before the final chunk compresses it
            pack.append((seq, n_tokens))
        self._run_pack(pack, step)
        outputs, self.carried = self.carried, []
        return outputs

    def _run_pack(self, pack: list[tuple[Sequence, int]], step: Step) -> None:
        """Run one pack; its first tokens join `self.carried` (returned by this step, or by the next
        one if a later pack of this step fails: a failing pack fails alone)."""
        if not pack:
            return
        self.last_step = Step("prefill", [seq for seq, _ in pack], step.n_tokens)
        try:
            results = self.runner.prefill_packed(pack)
        except Exception:
            if len(pack) == 1:
                raise
            for chunk in pack:  # nothing was committed: run them one by one, so only the culprit fails
                self._run_pack([chunk], step)
            return
        for (seq, _), logits in zip(pack, results, strict=True):
            if logits is None:
                continue
            if seq.cache_ids is not None and not seq.policy.compresses:
                self.prefix_cache.insert(seq.cache_ids, self.snapshot(seq, copy=False))  # insert copies
            self.carried += self.emit([seq], logits)

    def _would_seed(self, a: Sequence, b: Sequence) -> bool:
        """Whether running `a` first may give `b` a hit: `a` found nothing cached and both begin with
        the same block. (When `a` itself hit, `b` finds the same entry without waiting for `a`.)"""
        n = self.prefix_cache.block_size
        return (
            a.cache_ids is not None
            and a.cached_tokens == 0
            and len(b.cache_ids) > n
            and a.cache_ids[:n] == b.cache_ids[:n]
        )

    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Run a queued sequence's whole prompt now, chunk by chunk, and return the last position's
        logits without sampling: compress-once, speculative decoding and the benchmarks need the KV
        (or the logits) of a prompt, not a token."""
        if seq.slot is None:
            self.scheduler.admit()
        if seq.slot is None:
            raise RuntimeError(f"{seq.request_id} is not running: no free KV slot (or it is not queued)")
        logits = None
        while seq.prefilled < seq.prompt_len:
            logits = self.runner.prefill(seq, self.scheduler.chunk(seq))
        return logits

    def _attach_cached_prefix(self, seq: Sequence) -> int:
        """Start `seq` from the longest cached prefix of its prompt; returns the tokens left to prefill."""
        prefix, n = self.prefix_cache.lookup(seq.cache_ids)
        if prefix is not None:
            seq.prefix, seq.cached_tokens, seq.prompt_ids = prefix, n, seq.cache_ids[n:]
            seq.prefix_tokens = n
        return seq.prompt_len

    def _cache_staged(self, seq: Sequence) -> None:
        staged = self.runner.staged(seq)
        if staged is not None:
            pool, slot = staged
            fill = pool.slots[slot].fill
            ctx = CompressedContext.from_slot(pool, slot, "", {"name": "full"}, fill, copy=False)
            self.prefix_cache.insert(seq.cache_ids, ctx)  # insert copies what it keeps

    def snapshot(self, seq: Sequence, copy: bool = True) -> CompressedContext:
        """The KV a running sequence holds (prompt, and output so far); `copy=False`: views of its slot."""
        record = {"name": seq.policy.name}
        n_tokens = seq.prompt_len + seq.prefix_tokens
        return CompressedContext.from_slot(self.pool, seq.slot, "", record, n_tokens, copy=copy)

    def emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        """Sample one token per sequence from `logits` [B, V] and append it."""
        tokens = sample(
            logits,
            [s.params for s in seqs],
            [s.generator for s in seqs],
            [s.output_ids for s in seqs],
            [s.constraint for s in seqs],
        )
        return [self._append(seq, [token])[0] for seq, token in zip(seqs, tokens, strict=True)]

    def append_tokens(self, seq: Sequence, ids: list[int]) -> list[StepOutput]:
        """Append tokens chosen outside the sampler (speculative verification accepted them) as if they
        had been generated one by one: detokenized, checked for EOS, stop strings and length; stops at
        the token that finishes the sequence."""
        self.runner.record(seq)  # the caller's own forward changed the slot
        return self._append(seq, ids)

    def _append(self, seq: Sequence, ids: list[int]) -> list[StepOutput]:
        now = time.perf_counter()
        outputs = []
        for token in ids:
            seq.output_ids.append(token)
            seq.token_times.append(now)
            if seq.first_token_at is None:
                seq.first_token_at = now
            outputs.append(self._advance(seq, token))
            if outputs[-1].finished:
                break
        return outputs

    def _advance(self, seq: Sequence, token: int) -> StepOutput:
        eos = token in self.loaded.eos_ids and not seq.params.ignore_eos
        ids = seq.output_ids[:-1] if eos else seq.output_ids
        text = seq.text + self._detokenize(seq, ids, flush=eos)
        reason = "stop" if eos else None
        # only the tail can hold a new match: the text before it was searched in earlier steps
        cuts = [
            i
            for stop in seq.params.stop
            if (i := text.find(stop, max(0, len(seq.text) - len(stop) + 1))) != -1
        ]
        if cuts:
            text, reason = text[: min(cuts)], "stop"
        if reason is None and len(seq.output_ids) >= seq.params.max_new_tokens:
            reason = "length"
        new_text, seq.text = text[len(seq.text) :], text
        if reason:
            seq.finish_reason = reason
            self._finish(seq)
        return StepOutput(seq, new_text, reason is not None)

    def _detokenize(self, seq: Sequence, ids: list[int], flush: bool) -> str:
        """The text the newest tokens add, decoding only the tokens since the last emitted piece (plus the
        piece before, for the tokenizer's context: leading spaces, merges) instead of the whole output.
        Text that ends in an incomplete UTF-8 character waits for the rest unless `flush`."""
        start, read = seq.detok_offsets
        before = self.tokenizer.decode(ids[start:read], skip_special_tokens=True)
        text = self.tokenizer.decode(ids[start:], skip_special_tokens=True)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not flush):
            return ""
        seq.detok_offsets = (read, len(ids))
        return text[len(before) :]

    def _finish(self, seq: Sequence) -> None:
        seq.finished_at = time.perf_counter()
        self.runner.release(seq)
        self.scheduler.finish(seq)
        self.sequences.pop(seq.request_id, None)
