"""Per-request sampling: greedy, temperature, top-k, top-p, with a per-request seed; OpenAI's presence and
frequency penalties; and an optional constraint (a grammar, see `engine.grammar`) that masks the logits
before any of it, so even a greedy or hot request can only produce tokens the grammar allows."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Protocol

import torch

from longserve.errors import InvalidParameterError

#: torch.Generator seeds are 64-bit; the upper half is refused so a seed means the same thing everywhere
#: (a signed int64 in JSON clients, numpy, C) instead of overflowing deep in the engine thread.
SEED_LIMIT = 2**63


def _is_int(value: object) -> bool:
    """An integer that is not a bool (``True`` is an int to Python, never a sensible count or seed)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


#: OpenAI's range for presence_penalty and frequency_penalty.
PENALTY_LIMIT = 2.0


class Constraint(Protocol):
    """One sequence's decoding constraint (stateful: it follows the tokens sampled so far)."""

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """A bool mask [vocab_size] of the tokens that may come next (never all False)."""
        ...

    def accept(self, token: int) -> None:
        """Advance past a sampled token."""
        ...


class Grammar(Protocol):
    """What a request carries (immutable, shareable between sequences); each sequence gets a matcher."""

    def matcher(self) -> Constraint: ...


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # OpenAI semantics, over the tokens generated so far:
    # logits[t] -= presence_penalty * (count[t] > 0) + frequency_penalty * count[t]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: Grammar | None = None  # e.g. `engine.grammar.json_grammar(...)`: structured output

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            (
                "temperature",
                _is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
                ">= 0 and finite",
            ),
            ("top_p", _is_real(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0"),
            (
                "seed",
                self.seed is None or (_is_int(self.seed) and 0 <= self.seed < SEED_LIMIT),
                "an integer in [0, 2**63)",
            ),
            *(
                (
                    name,
                    _is_real(v := getattr(self, name)) and -PENALTY_LIMIT <= v <= PENALTY_LIMIT,
                    "in [-2, 2]",
                )
                for name in ("presence_penalty", "frequency_penalty")
            ),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InvalidParameterError(f"{name} must be {rule} (got {getattr(self, name)!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def penalize(logits: torch.Tensor, params: SamplingParams, output_ids: list[int]) -> torch.Tensor:
    """One row of logits less the presence and frequency penalties of the tokens generated so far."""
    if not params.penalized or not output_ids:
        return logits
    vocab = logits.shape[-1]
    counts = torch.bincount(torch.as_tensor(output_ids, device=logits.device), minlength=vocab)[:vocab]
    counts = counts.to(logits.dtype)
    return (
        logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    )


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row of logits; returns probabilities."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    outputs: list[list[int]] | None = None,
    constraints: list[Constraint | None] | None = None,
) -> list[int]:
    """logits [B, V] -> one token per row. `outputs`: each row's generated tokens (for the penalties);
    `constraints`: each row's constraint, masked in first and advanced past the chosen token. Plain
    greedy rows skip all filtering (one batched argmax)."""
    outputs = outputs if outputs is not None else [[] for _ in params]
    constraints = constraints if constraints is not None else [None] * len(params)
    greedy = logits.argmax(-1).tolist()
    out = []
    for row, (p, gen, done, constraint) in enumerate(
        zip(params, generators, outputs, constraints, strict=True)
    ):
        if p.greedy and not p.penalized and constraint is None:
            out.append(greedy[row])
            continue
        x = penalize(logits[row].float(), p, done)
        if constraint is not None:
            x = x.masked_fill(~constraint.allowed(x.shape[-1]).to(x.device), float("-inf"))
        token = int(x.argmax() if p.greedy else torch.multinomial(filter_logits(x, p), 1, generator=gen))
        if constraint is not None:
            constraint.accept(token)
        out.append(token)
    return out
