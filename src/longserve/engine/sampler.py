"""Per-request sampling: greedy, temperature, top-k, top-p, with a per-request seed."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

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


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

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
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InvalidParameterError(f"{name} must be {rule} (got {getattr(self, name)!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits [B, V] -> one token per row. Greedy rows skip all filtering."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            out.append(greedy[row])
        else:
            probs = filter_logits(logits[row].float(), p)
            out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out
