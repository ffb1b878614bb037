"""AdaKV (Feng et al., 2024): head-adaptive budgets around any scoring policy, `AdaKVPolicy(SnapKVPolicy(...))`.

Instead of `budget` tokens per KV head, one top-k over all heads of a layer keeps `budget * kv_heads`
entries, so heads whose attention is spread keep more tokens and focused heads fewer. The bytes held
are the uniform budget's; each head is still guaranteed `head_floor` of its uniform share of the
selected (middle) tokens. The slot then holds a flat (head, token) layout (see `kv/cache.py`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from longserve.errors import InvalidParameterError
from longserve.kv.policies.base import Policy, ScoreInputs
from longserve.kv.policies.wrapper import PolicyWrapper


class AdaKVPolicy(PolicyWrapper):
    options: ClassVar[tuple[str, ...]] = ("head_floor",)
    head_adaptive: ClassVar[bool] = True  # shadows the wrapper's delegating property

    def __init__(self, policy: Policy, head_floor: float = 0.2):
        if policy.head_adaptive:
            raise InvalidParameterError("AdaKV cannot wrap a policy that is already head-adaptive")
        if not policy.compresses or policy.decode.accumulates_scores or not policy.window:
            raise InvalidParameterError(
                f"head_adaptive budgets are not supported by policy '{policy.name}': it "
                "must evict at prefill, then append or ring over a recent window > 0"
            )
        if not 0 <= head_floor <= 1:
            raise InvalidParameterError(f"head_floor must be in [0, 1], got {head_floor}")
        super().__init__(policy)
        self.head_floor = head_floor

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "head_adaptive": True}

    def select_adaptive(self, inputs: ScoreInputs, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(head, token) index pairs of the `n_keep * kv_heads` entries one layer keeps.

        Sinks and the recent window are kept in every head; the rest of the layer's share is one
        top-k over all heads (each head first gets `head_floor` of its uniform share). Order: the
        selected entries by head then position, then the window token by token (all heads of a token
        together), so a ring over the recent region overwrites whole tokens."""
        hkv, length, _ = inputs.keys.shape
        n_window = min(self.window, length)
        middle = length - n_window
        scores = self.score(inputs).float().expand(hkv, length)[:, :middle].clone()
        scores[:, : self.n_sink] = float("inf")
        share = n_keep - n_window  # selected tokens per head under a uniform budget
        floor = min(share, max(self.n_sink, int(self.head_floor * share)))
        if floor:
            scores.scatter_(1, scores.topk(floor, dim=-1).indices, float("inf"))
        flat = scores.flatten().topk(share * hkv).indices.sort().values  # head-major, then position
        heads, tokens = flat // middle, flat % middle
        dev = inputs.keys.device
        recent = torch.arange(middle, length, device=dev)
        heads = torch.cat([heads, torch.arange(hkv, device=dev).repeat(n_window)])
        tokens = torch.cat([tokens, recent.repeat_interleave(hkv)])
        return heads, tokens
