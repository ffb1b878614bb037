"""Speculative decoding: a small draft model proposes tokens, the target verifies them in one forward.

Per round the draft runs `k` decode steps in its own KV slot, the target runs the pending token plus the
`k` drafts as ONE forward over its cache (`last_only=False`), the acceptance rule (`spec.accept`) keeps a
prefix of the drafts plus one target token, and both caches roll back to exactly what a plain run would
hold (`spec.rollback`). Greedy output is the target's greedy output token for token; sampled output
follows the target's (temperature / top-k / top-p filtered) distribution exactly.

One sequence at a time (batch 1): `generate()` with several prompts runs them one after another.
Every KV policy works, with rollback as described in `longserve.spec.rollback`: truncation for append
policies (full, snapkv, knorm, random), journaled undo for ring/evict/sparse ones (streaming, sage,
snapstream, h2o, quest). Head-adaptive budgets (`head_adaptive=True`) are refused: their flat layout
has no per-head journal.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from longserve.engine.engine import LLMEngine, StepOutput
from longserve.engine.sampler import SamplingParams, filter_logits
from longserve.engine.sequence import Sequence
from longserve.errors import InvalidParameterError, LongserveError
from longserve.kv.policies import Policy
from longserve.llm import LLM, Completion, Prompt
from longserve.spec.accept import greedy_accept, stochastic_accept
from longserve.spec.rollback import SpeculativeSlot

_PROBES = (
    "def main():\n    return 0\n",
    "Hello, world! The quick brown fox.",
    "  x = [i ** 2 for i in range(10)]",
    "Ünïcödé ✓ 日本語 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    "1234567890 !@#$%^&*()",
)


class TokenizerMismatchError(LongserveError):
    """Draft and target tokenize differently: their token ids mean different things."""


def check_same_tokenizer(target: LLM, draft: LLM) -> None:
    """Refuse a draft whose token ids do not mean the same text as the target's."""
    t_tok, d_tok = target.tokenizer, draft.tokenizer
    names = f"draft {draft.loaded.name!r} and target {target.loaded.name!r}"
    hint = "pick a draft from the target's family (e.g. qwen2.5-coder-0.5b-instruct for the 1.5b)"
    if callable(getattr(t_tok, "get_vocab", None)) and callable(getattr(d_tok, "get_vocab", None)):
        t_vocab, d_vocab = t_tok.get_vocab(), d_tok.get_vocab()
        if t_vocab != d_vocab:
            diff = next((tok for tok, i in t_vocab.items() if d_vocab.get(tok) != i), None)
            raise TokenizerMismatchError(
                f"{names} use different tokenizers ({len(t_vocab)} vs {len(d_vocab)} tokens; e.g. {diff!r} is "
                f"{t_vocab.get(diff)} vs {d_vocab.get(diff)}); speculative decoding needs a shared vocabulary: {hint}"
            )
    for text in _PROBES:
        a, b = t_tok.encode(text, add_special_tokens=True), d_tok.encode(text, add_special_tokens=True)
        if list(a) != list(b):
            raise TokenizerMismatchError(
                f"{names} tokenize {text!r} differently ({list(a)[:8]}... vs {list(b)[:8]}...); {hint}"
            )


@dataclass
class SpecSequence(Sequence):
    """A target sequence whose stats include the speculative counters.

    draft_tokens_proposed / draft_tokens_accepted: summed over verify rounds; acceptance_rate: their ratio;
    mean_accepted_length: accepted drafts per verify round (0..k; each round also emits one target token);
    target_forward_passes: target forwards after the prefill (verify rounds + plain last steps), so
    tokens_per_target_forward = (completion_tokens - 1) / target_forward_passes (1.0 without speculation).
    """

    spec: dict = field(default_factory=dict)

    def stats(self) -> dict:
        out = super().stats()
        s = self.spec
        proposed, accepted, rounds = (
            s.get("draft_tokens_proposed", 0),
            s.get("draft_tokens_accepted", 0),
            s.get("verify_rounds", 0),
        )
        out.update(s)
        out["acceptance_rate"] = accepted / proposed if proposed else None
        out["mean_accepted_length"] = accepted / rounds if rounds else None
        out["tokens_per_target_forward"] = (
            (len(self.output_ids) - 1) / s["target_forward_passes"]
            if s.get("target_forward_passes")
            else None
        )
        return out


def format_stats(stats: dict) -> str:
    """One line for the CLI."""
    rate = stats.get("acceptance_rate")
    return (
        f"[speculative: draft {stats.get('draft_model')} | {stats.get('draft_tokens_accepted', 0)}/"
        f"{stats.get('draft_tokens_proposed', 0)} drafts accepted"
        f"{f' ({rate:.0%})' if rate is not None else ''} | mean accepted "
        f"{stats.get('mean_accepted_length') or 0:.2f} | {stats.get('target_forward_passes', 0)} target "
        f"forwards for {stats.get('completion_tokens', 0)} tokens | k now {stats.get('k_final')}]"
    )


class SpeculativeDecoder:
    """`SpeculativeDecoder(target, draft, k=4).generate(prompt, ...)` -> a `Completion` with spec stats.

    `k`: drafts per round (the start value when `adaptive`); adaptive k grows by one after a round where
    every draft was accepted and shrinks by one after a rejection, within [`k_min`, `k_max`].
    """

    def __init__(
        self,
        target: LLM,
        draft: LLM,
        k: int = 4,
        adaptive: bool = True,
        k_min: int = 1,
        k_max: int | None = None,
    ):
        if not isinstance(k, int) or k <= 0:
            raise InvalidParameterError(f"the number of draft tokens must be an integer >= 1, got {k!r}")
        k_max = k_max if k_max is not None else max(2 * k, 8) if adaptive else k
        if not 1 <= k_min <= k <= k_max:
            raise InvalidParameterError(f"need 1 <= k_min <= k <= k_max, got {k_min}, {k}, {k_max}")
        check_same_tokenizer(target, draft)
        self.target, self.draft = target, draft
        self.k, self.adaptive, self.k_min, self.k_max = k, adaptive, k_min, k_max
        self.vocab = target.loaded.args.vocab_size

    # ---- public API ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | list[int] | list[Prompt],
        sampling: SamplingParams | None = None,
        kv_policy: str | Policy | None = None,
        progress: bool = False,
        **options,
    ) -> Completion | list[Completion]:
        """One prompt (text, chat messages or token ids) -> a Completion; a list of prompts -> a list,
        run one after another. `options` as in `LLM.request()`."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict | int)
        )
        batch = [prompts] if single else list(prompts)
        params, policy = self.target.request(sampling, kv_policy, **options)
        out = []
        for prompt in tqdm(batch, disable=not progress, desc="speculative", unit="prompt"):
            last = None
            for piece in self.session(prompt, params, policy):
                last = piece
            seq = last.seq
            out.append(
                Completion(seq.text, list(seq.output_ids), seq.prompt_len, seq.finish_reason, seq.stats())
            )
        return out[0] if single else out

    def stream(
        self,
        prompt: Prompt | list[int],
        sampling: SamplingParams | None = None,
        kv_policy: str | Policy | None = None,
        draft_kv_policy: str | Policy | None = None,
        **options,
    ) -> Iterator[StepOutput]:
        """Yield text pieces like `LLM.stream`; the last has `finished=True` and `seq.stats()` with the
        speculative counters. The draft uses the target's KV policy unless `draft_kv_policy` is given."""
        yield from self.session(prompt, sampling, kv_policy, draft_kv_policy, **options)

    def session(
        self,
        prompt: Prompt | list[int],
        sampling: SamplingParams | None = None,
        kv_policy: str | Policy | None = None,
        draft_kv_policy: str | Policy | None = None,
        **options,
    ) -> SpeculativeRun:
        """A request to drive by hand: `start()` (prefill, first token), then `round()` until
        `seq.is_finished`; iterating it does both. Its engines and slots stay inspectable."""
        params, policy = self.target.request(sampling, kv_policy, **options)
        draft_policy = policy if draft_kv_policy is None else self.draft.policy(draft_kv_policy)
        if any(p.head_adaptive or p.layer_adaptive for p in (policy, draft_policy)):
            raise InvalidParameterError(
                "speculative decoding cannot roll back a head- or layer-adaptive KV cache; "
                "use a uniform budget (head_adaptive=False, layer_budgets='uniform')"
            )
        return SpeculativeRun(self, self.target.encode_any(prompt), params, policy, draft_policy)


class SpeculativeRun:
    """One request: the target's engine and sequence, the draft's slot, the counters."""

    def __init__(
        self,
        dec: SpeculativeDecoder,
        ids: list[int],
        params: SamplingParams,
        policy: Policy,
        draft_policy: Policy,
    ):
        self.dec, self.params = dec, params
        n = params.max_new_tokens
        self.engine: LLMEngine = dec.target.engine(1, policy.capacity(len(ids), n))
        self.seq = self.engine.add_sequence(SpecSequence(list(ids), params, policy))
        self.draft_engine: LLMEngine = dec.draft.engine(1, draft_policy.capacity(len(ids), n))
        self.draft_seq = self.draft_engine.add_request(
            list(ids), SamplingParams(max_new_tokens=n), draft_policy
        )
        self.k = dec.k
        self.draft_len = 0  # tokens of prompt + output the draft's cache holds
        self.seq.spec = {
            "speculative": True,
            "draft_model": dec.draft.loaded.name,
            "num_draft_tokens": dec.k,
            "adaptive": dec.adaptive,
            "draft_tokens_proposed": 0,
            "draft_tokens_accepted": 0,
            "verify_rounds": 0,
            "target_forward_passes": 0,
            "draft_forward_passes": 0,
            "target_prefill_passes": 0,
            "k_final": dec.k,
        }

    def __iter__(self) -> Iterator[StepOutput]:
        yield from self.start()
        while not self.seq.is_finished:
            yield from self.round()

    def start(self) -> Iterator[StepOutput]:
        """Prefill both models; the target's prefill samples the first token exactly like `LLM.stream`."""
        eng = self.draft_engine
        eng.prefill(self.draft_seq)
        self.draft_len = self.draft_seq.prompt_len
        self.draft = SpeculativeSlot(eng.runner.model, eng.pool, self.draft_seq.slot)
        outputs: list[StepOutput] = []
        while not outputs:
            outputs = self.engine.step()
            self.seq.spec["target_prefill_passes"] += 1
        self.target = SpeculativeSlot(self.engine.runner.model, self.engine.pool, self.seq.slot)
        if self.seq.is_finished:
            self.draft_engine.abort(self.draft_seq.request_id)
        yield from outputs

    # ---- one round -----------------------------------------------------------------------------
    def _draft_logits(self, logits: torch.Tensor) -> torch.Tensor:
        v = self.dec.vocab  # the draft's extra ids can never be accepted; missing ones have q = 0
        if logits.shape[-1] >= v:
            return logits[..., :v]
        return torch.nn.functional.pad(logits, (0, v - logits.shape[-1]), value=float("-inf"))

    def _propose(self, n: int) -> tuple[list[int], list[torch.Tensor]]:
        """n draft tokens (and their filtered distributions when sampling)."""
        seq, params = self.seq, self.params
        context = seq.prompt_ids + seq.output_ids
        feed = context[self.draft_len :]
        drafts, q = [], []
        for _ in range(n):
            logits = self._draft_logits(self.draft.forward(feed)[-1])
            self.seq.spec["draft_forward_passes"] += 1
            if params.greedy:
                token = int(logits.argmax())
            else:
                probs = filter_logits(logits.float(), params)
                token = int(torch.multinomial(probs, 1, generator=seq.generator))
                q.append(probs)
            drafts.append(token)
            feed = [token]
        return drafts, q

    def round(self) -> Iterator[StepOutput]:
        seq, params, spec = self.seq, self.params, self.seq.spec
        k = max(0, min(self.k, params.max_new_tokens - len(seq.output_ids) - 1))
        catch_up = len(seq.prompt_ids) + len(seq.output_ids) - self.draft_len
        drafts, q = self._propose(k) if k else ([], [])
        logits = self.target.forward([seq.output_ids[-1], *drafts])
        spec["target_forward_passes"] += 1
        if params.greedy:
            n, token = greedy_accept(drafts, logits)
        else:
            p = torch.stack([filter_logits(row.float(), params) for row in logits])
            n, token = stochastic_accept(drafts, torch.stack(q) if q else p[:0], p, seq.generator)
        self.target.commit(n + 1)
        if k:
            kept = catch_up + min(n, k - 1)
            self.draft.commit(kept)
            self.draft_len += kept
            spec["verify_rounds"] += 1
            spec["draft_tokens_proposed"] += k
            spec["draft_tokens_accepted"] += n
            if self.dec.adaptive:
                step = 1 if n == k else -1
                self.k = min(self.dec.k_max, max(self.dec.k_min, self.k + step))
            spec["k_final"] = self.k
        for out in self.engine.append_tokens(seq, [*drafts[:n], token]):
            if out.finished:
                self.draft_engine.abort(self.draft_seq.request_id)
            yield out
