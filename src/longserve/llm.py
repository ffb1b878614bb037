"""The Python API: `LLM(model, kv_policy=..., kv_budget=...).generate(prompts, ...)`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm.auto import tqdm

from longserve.context import CompressedContext
from longserve.engine.compiled_decode import StepCompiler, compile_mode, pool_capacity
from longserve.engine.engine import LLMEngine, StepOutput
from longserve.engine.prefix_cache import CachePrefix, PrefixCache
from longserve.engine.sampler import SamplingParams
from longserve.errors import InvalidParameterError
from longserve.kv.policies import FullPolicy, Policy, make_policy
from longserve.loader import DTYPES, LoadedModel, dtype_and_weights, load
from longserve.model.quant import QUANTIZED, quantize
from longserve.zoo import DEFAULT_MODEL

Prompt = str | list[dict]  # raw text, or chat messages [{"role": ..., "content": ...}]
SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str | None
    stats: dict = field(default_factory=dict)


class LLM:
    """Load a model once, then generate under any KV policy.

    `kv_policy` / `kv_budget` (tokens) / `kv_ratio` (of the prompt) set the default policy; every
    call may override them. `dtype="auto"` runs bfloat16 on CPUs with native bf16 (AVX512-BF16 / AMX)
    and float32 elsewhere; "float32", "bfloat16" or "float16" force one. `weights="int8"` / `"int4"`
    quantizes the linear layers (weight-only, CPU kernels; see `longserve.model.quant`), "bf16" / "fp32"
    keep them dense in that dtype. Extra keyword arguments (`window=`, `n_sink=`, `kernel=`...) go to the
    policy's constructor.

    `compile=True` (or a mode name: "default", "freezing", "autotune", see
    `compiled_decode.COMPILE_MODES`; on SmolLM2 neither of the others beat "default" beyond noise, see
    bench/results/decode_ab_compiled.md): decode steps run a `torch.compile`d graph per batch size, under
    fixed-size policies (`snapstream`, `streaming`, `sage`) and append ones (`full`...) alike, compiled on
    first use (minutes on a cold inductor cache, less on a warm one) and shared by every engine of this
    LLM; H2O, Quest and head-adaptive slots decode eagerly.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        kv_policy: str = "full",
        kv_budget: int | None = None,
        kv_ratio: float | None = None,
        dtype: str = "auto",
        weights: str = "auto",
        max_batch_size: int = 8,
        prefill_chunk: int = 4096,
        threads: int | None = None,
        progress: bool = True,
        loaded: LoadedModel | None = None,
        draft: str | LLM | None = None,
        num_draft_tokens: int = 4,
        prefix_cache: str | int | None = None,
        device: str | torch.device | None = None,
        compile: bool | str = False,
        **policy_kwargs,
    ):
        if loaded is not None and dtype == "auto":  # a model handed in keeps the dtype it has
            dtype = next(k for k, v in DTYPES.items() if v == loaded.model.model.embed_tokens.weight.dtype)
        # "auto": bf16 where the hardware has it (loader.default_dtype); weights: dense or int8/int4
        dtype, weights = dtype_and_weights(dtype, weights, device)
        compile_args = compile_mode("default" if compile is True else compile) if compile else None
        if threads:
            torch.set_num_threads(threads)
        self.loaded = loaded or load(model, dtype=dtype, progress=progress, weights=weights)
        if loaded is not None and weights in QUANTIZED:
            quantize(loaded.model, weights)
        self.weights = weights
        if device is not None:  # the engine then builds its KV pool where the weights are
            self.loaded.model.to(device)
        self.device = next(self.loaded.model.parameters()).device
        # bf16 (and quantized, bf16-activation) GEMMs: one-token steps padded to two rows, so a token's
        # logits do not depend on how many rows its forward ran (exact speculative decoding); in fp32
        # the 2-row GEMM is the slower MKL path, so fp32 keeps the 1-row GEMV
        activations = self.loaded.model.model.embed_tokens.weight.dtype
        self.loaded.model.row_invariant = activations != torch.float32
        self.tokenizer = self.loaded.tokenizer
        self.dtype = DTYPES[dtype]
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        self.default_policy = (kv_policy, kv_budget, kv_ratio, policy_kwargs)
        make_policy(kv_policy, budget=kv_budget, ratio=kv_ratio, **policy_kwargs)  # fail early on bad input
        self.prefix_cache = None  # KV of earlier prompts' prefixes, reused across calls (`full` policy)
        if prefix_cache:
            from longserve.server.kv_plan import parse_byte_size

            self.prefix_cache = PrefixCache(parse_byte_size(prefix_cache, "prefix_cache"), self.fingerprint)
        self.compiler = None
        if compile_args is not None:
            mode, options = compile_args
            self.compiler = StepCompiler(self.loaded.model, mode=mode, options=options)
        self.speculative = None  # speculative decoding with a draft model that shares our tokenizer
        if draft is not None:
            from longserve.spec import SpeculativeDecoder

            draft_llm = (
                draft
                if isinstance(draft, LLM)
                else LLM(draft, dtype=dtype, weights=weights, threads=threads, progress=progress)
            )
            self.speculative = SpeculativeDecoder(self, draft_llm, k=num_draft_tokens)

    # ---- prompts -------------------------------------------------------------------------------
    @property
    def context_window(self) -> int:
        return self.loaded.context_window

    @property
    def fingerprint(self) -> str:
        args = json.dumps(asdict(self.loaded.args), sort_keys=True, default=str)
        weights = self.loaded.model.lm_head.weight.detach()
        probe = f"{args}|{float(weights[:4, :4].double().sum()):.10e}|{self.dtype}"
        return f"{self.loaded.args.family}-{hashlib.sha256(probe.encode()).hexdigest()[:16]}"

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not self.tokenizer.chat_template:
            raise InvalidParameterError("this model has no chat template: pass raw text instead of messages")
        return list(
            self.tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )

    def split_chat(self, context: str, question: str, sep: str = "\n\n") -> tuple[list[int], list[int]]:
        """Token ids of (everything up to the end of the context, the rest) for one user turn that reads
        `context + sep + question`: the prefix can be compressed before the question is known."""
        marker = "\u2063LONGSERVE_SPLIT\u2063"
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{context}{marker}{sep}{question}"}],
                add_generation_prompt=True,
                tokenize=False,
            )
        else:
            text = f"{context}{marker}{sep}{question}\n"
        head, tail = text.split(marker)
        has_bos_in_text = self.tokenizer.bos_token and head.startswith(self.tokenizer.bos_token)
        head_ids = self.tokenizer.encode(head, add_special_tokens=not has_bos_in_text)
        tail_ids = self.tokenizer.encode(tail, add_special_tokens=False)
        return head_ids, tail_ids

    def chat_prefix_len(self, prompt, ids: list[int]) -> int | None:
        """Chat messages: how many of `ids` render everything before the last message (the part a
        conversation resends each turn); None for other prompts."""
        if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)) or len(prompt) < 2:
            return None
        head = self.tokenizer.apply_chat_template(prompt[:-1], tokenize=True, return_dict=True)["input_ids"]
        n = next(
            (i for i, (a, b) in enumerate(zip(head, ids, strict=False)) if a != b), min(len(head), len(ids))
        )
        return n or None

    @staticmethod
    def full_after_prefix(kv_policy):
        if kv_policy not in (None, "full") and not isinstance(kv_policy, FullPolicy):
            raise InvalidParameterError(
                "with cache_prefix the rest of the prompt runs under 'full'; compress the prefix with "
                "cache_prefix={'policy': ...} instead of kv_policy"
            )
        return FullPolicy()

    def policy(self, kv_policy=None, kv_budget=None, kv_ratio=None, **kwargs) -> Policy:
        if isinstance(kv_policy, Policy):
            return kv_policy
        name, budget, ratio, defaults = self.default_policy
        if kv_policy is not None and kv_policy != name:
            budget, ratio, defaults = None, None, {}
        merged = {**defaults, **kwargs}
        return make_policy(kv_policy or name, budget=kv_budget or budget, ratio=kv_ratio or ratio, **merged)

    # ---- generation ----------------------------------------------------------------------------
    def engine(
        self,
        n_slots: int,
        capacity: int,
        max_step_tokens: int | None = None,
        layer_shift: tuple[int, ...] | None = None,
    ) -> LLMEngine:
        """A fresh engine over this model: `n_slots` KV slots of `capacity` tokens each (the server, the
        speculative decoder and the benchmarks drive one directly); `layer_shift`: per layer, entries
        fewer a global layer stores (sized for one layer-adaptive context, see `KVPool`)."""
        return LLMEngine(
            self.loaded,
            n_slots,
            capacity,
            max_tokens=self.context_window,
            prefill_chunk=self.prefill_chunk,
            dtype=self.dtype,
            max_step_tokens=max_step_tokens,
            prefix_cache=self.prefix_cache,
            device=self.device,
            compiler=self.compiler,
            layer_shift=layer_shift,
        )

    def call_capacity(self, capacity: int, policy: Policy) -> int:
        """Slot capacity of a per-call engine (`generate`, `stream`): with `compile` on and a growing
        (append) policy, rounded up (`compiled_decode.pool_capacity`) so that calls of nearby sizes
        share a compiled graph; a fixed-size policy's slot is its budget either way."""
        if self.compiler is None or policy.decode.fixed_size:
            return capacity
        return pool_capacity(capacity, self.context_window)

    def request(
        self, sampling: SamplingParams | None = None, kv_policy: str | Policy | None = None, **options
    ) -> tuple[SamplingParams, Policy]:
        """One request's parameters: `SamplingParams` (given, or built from its field names among
        `options`: `max_new_tokens=`, `temperature=`, `stop=`...) and the KV policy (`kv_policy` with
        `kv_budget=` / `kv_ratio=` and the policy's own keywords, over this LLM's default policy)."""
        given = {name: options.pop(name) for name in SAMPLING_FIELDS & options.keys()}
        if sampling is not None and given:
            raise InvalidParameterError(
                f"pass sampling parameters as SamplingParams or as keywords, not both (got {sorted(given)})"
            )
        if given.get("stop") is None:
            given.pop("stop", None)
        params = sampling if sampling is not None else SamplingParams(**given)
        budget, ratio = options.pop("kv_budget", None), options.pop("kv_ratio", None)
        return params, self.policy(kv_policy, budget, ratio, **options)

    def encode_any(self, prompt: Prompt | list[int]) -> list[int]:
        """Token ids as they are, or text / chat messages encoded."""
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            return list(prompt)
        return self.encode(prompt)

    def generate(
        self,
        prompts: Prompt | list[int] | list[Prompt] | list[list[int]],
        sampling: SamplingParams | None = None,
        kv_policy: str | Policy | None = None,
        progress: bool = False,
        **options,
    ) -> list[Completion]:
        """Generate for a batch of prompts (text, chat messages or token ids); sequences are decoded
        together, up to `max_batch_size`. `options`: see `request()`."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict | int)
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            return []
        cache_prefix = options.pop("cache_prefix", None)
        if cache_prefix is not None:  # the suffix appends to the compressed prefix, as `ask` does
            kv_policy = self.full_after_prefix(kv_policy)
        params, policy = self.request(sampling, kv_policy, **options)
        if self.speculative:
            return [self.speculative.generate(p, params, policy) for p in batch]
        encoded = [self.encode_any(p) for p in batch]
        capacity = max(policy.capacity(len(ids), params.max_new_tokens) for ids in encoded)
        engine = self.engine(min(len(batch), self.max_batch_size), self.call_capacity(capacity, policy))
        prefixes = [
            None
            if cache_prefix is None
            else CachePrefix.from_spec(cache_prefix, self.chat_prefix_len(p, ids))
            for p, ids in zip(batch, encoded, strict=True)
        ]
        seqs = [
            engine.add_request(ids, params, policy, cache_prefix=prefix)
            for ids, prefix in zip(encoded, prefixes, strict=True)
        ]
        total = sum(len(ids) + params.max_new_tokens for ids in encoded)
        with tqdm(total=total, disable=not progress, desc="generate", unit="tok") as bar:
            while engine.has_unfinished():
                before = sum(s.prefilled + len(s.output_ids) for s in seqs)
                engine.step()
                bar.update(sum(s.prefilled + len(s.output_ids) for s in seqs) - before)
        return [Completion(s.text, s.output_ids, s.prompt_len, s.finish_reason, s.stats()) for s in seqs]

    def stream(
        self,
        prompt: Prompt | list[int],
        sampling: SamplingParams | None = None,
        kv_policy: str | Policy | None = None,
        prefix: CompressedContext | None = None,
        **options,
    ) -> Iterator[StepOutput]:
        """Yield text pieces as they are generated; the last output has `finished=True` and the stats.
        With a `prefix` (a compressed context) the prompt is appended to it under the `full` policy."""
        if prefix is not None:
            kv_policy = FullPolicy()
        params, policy = self.request(sampling, kv_policy, **options)
        if self.speculative and prefix is None:
            yield from self.speculative.stream(prompt, params, policy)
            return
        ids = self.encode_any(prompt)
        capacity = policy.capacity(len(ids), params.max_new_tokens) + (prefix.fill if prefix else 0)
        shift = prefix.layer_shift(self.loaded.args.layer_windows) if prefix is not None else None
        # each layer sized to what it holds
        engine = self.engine(1, self.call_capacity(capacity, policy), layer_shift=shift)
        engine.add_request(ids, params, policy, prefix=prefix)
        while engine.has_unfinished():
            yield from engine.step()

    # ---- compress once, ask many ---------------------------------------------------------------
    def compress(
        self,
        context: str | list[int],
        kv_policy: str | Policy | None = None,
        kv_budget: int | None = None,
        kv_ratio: float | None = None,
        **policy_kwargs,
    ) -> CompressedContext:
        """Compress a context before any question is known (query-agnostic). With a chat model the
        context is the opening of a user turn; `ask()` appends the question and the turn's end."""
        policy = self.policy(kv_policy, kv_budget, kv_ratio, **policy_kwargs)
        ids = context if isinstance(context, list) else self.split_chat(context, "")[0]
        engine = self.engine(1, policy.capacity(len(ids), 1))
        seq = engine.add_request(ids, SamplingParams(max_new_tokens=1), policy)
        engine.prefill(seq)
        ctx = CompressedContext.from_slot(
            engine.pool, seq.slot, self.fingerprint, policy.describe(), len(ids)
        )
        engine.abort(seq.request_id)
        return ctx

    def ask(self, ctx: CompressedContext, question: str, max_new_tokens: int = 64, **sampling) -> Completion:
        """Answer one question from a compressed context; the context itself is not modified."""
        if ctx.model_fingerprint != self.fingerprint:
            raise InvalidParameterError("this compressed context was made with another model")
        marker_free_tail = self.split_chat("", question)[1]
        last = None
        for out in self.stream(marker_free_tail, max_new_tokens=max_new_tokens, prefix=ctx, **sampling):
            last = out
        seq = last.seq
        return Completion(seq.text, seq.output_ids, seq.prompt_len, seq.finish_reason, seq.stats())
