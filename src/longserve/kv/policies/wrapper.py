"""A policy that wraps another (kvpress's `AdaKVPress(press)` pattern): it is a `Policy` with the
wrapped policy's budget, window and decode strategy, and overrides only what it changes.

A wrapper is a plain class, not a dataclass: its parameters are its own, the budget stays the
wrapped policy's single source of truth.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from longserve.kv.policies.base import Policy, ScoreInputs, ScoringChunk
from longserve.kv.policies.strategy import DecodeStrategy


class PolicyWrapper(Policy):
    """Delegates everything to `self.policy`; subclasses override `score`/`select` or add checks."""

    options: ClassVar[tuple[str, ...]] = ()  # the wrapper's own parameters (for `describe` and `replace`)

    def __init__(self, policy: Policy):
        self.policy = policy

    # the wrapped policy's sizes and capabilities: properties shadow the base's dataclass defaults
    budget = property(lambda self: self.policy.budget)
    ratio = property(lambda self: self.policy.ratio)
    window = property(lambda self: self.policy.window)
    n_sink = property(lambda self: self.policy.n_sink)
    name = property(lambda self: self.policy.name)
    compresses = property(lambda self: self.policy.compresses)
    sparse_decode = property(lambda self: self.policy.sparse_decode)
    has_scoring_pass = property(lambda self: self.policy.has_scoring_pass)

    @property
    def decode(self) -> DecodeStrategy:
        return self.policy.decode

    @property
    def head_adaptive(self) -> bool:
        return self.policy.head_adaptive

    @property
    def layer_adaptive(self) -> bool:
        return self.policy.layer_adaptive

    def kept(self, prompt_len: int) -> int:
        return self.policy.kept(prompt_len)

    def capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        return self.policy.capacity(prompt_len, max_new_tokens)

    def max_kept(self, prompt_len: int) -> int:
        return self.policy.max_kept(prompt_len)

    def layer_kept(
        self, prompt_len: int, layers: list[int], pass_scores: list[torch.Tensor | None] | None
    ) -> dict[int, int] | None:
        return self.policy.layer_kept(prompt_len, layers, pass_scores)

    def protected_prefix(self, kept: int) -> int:
        return self.policy.protected_prefix(kept)

    def scoring_pass(self, prompt_ids: list[int], tokenizer: Any) -> list[ScoringChunk] | None:
        return self.policy.scoring_pass(prompt_ids, tokenizer)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.policy.score(inputs)

    def select_adaptive(self, inputs: ScoreInputs, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy.select_adaptive(inputs, n_keep)

    def describe(self) -> dict[str, Any]:
        return {**self.policy.describe(), **{k: getattr(self, k) for k in self.options}}

    def replace(self, **changes: Any) -> Policy:
        from longserve.kv.policies import WRAPPERS, make_policy  # the registry imports this module

        if type(self) in WRAPPERS.values():  # its keyword may also switch it off
            return make_policy(**(self.describe() | changes))
        own = {k: changes.pop(k) for k in self.options if k in changes}
        kwargs = {k: getattr(self, k) for k in self.options} | own
        return type(self)(self.policy.replace(**changes), **kwargs)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.describe() == self.describe()

    __hash__ = None

    def __repr__(self) -> str:
        own = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options)
        return f"{type(self).__name__}({self.policy!r}{', ' + own if own else ''})"
