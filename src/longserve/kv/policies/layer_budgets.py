"""Per-layer budgets around any compressing policy: `LayerBudgetPolicy(KVzipPolicy(...), "global")`.

A uniform budget keeps the same number of tokens in every layer, but layers need very different
amounts: on a natural-text multi-key haystack (Qwen2.5-Coder-0.5B, KVzip at 4x) one threshold over
all layers and heads (kvpress's default) answered 8 of 8 keys where a per-layer top-k answered 1 of 4.
This wrapper spends the same total bytes (`kept(prompt) * layers`) and decides how many tokens each
layer keeps; the wrapped policy still selects which ones inside each layer (per head, or over heads
when it is also head-adaptive: `layer_budgets="global"` + `head_adaptive=True` is kvpress's global
threshold).

Schedules:
- `global`: each layer's share of one top-k of the scoring pass's scores over every (layer, head,
  token) entry; needs a policy whose scores for every layer exist before any is pruned (KVzip).
- `pyramid` (PyramidKV, Cai et al., 2024): a linear schedule, lower layers keep more; the top layer's
  selected part is 1/`PYRAMID_BETA` of the uniform share and the bottom layer's about twice it.

A layer keeps at most `layer_cap` times the uniform budget: the bound a running slot is sized for
(`max_kept`). The default, 8, is what the bench needed: on Qwen2.5-Coder-0.5B multi-key at 12.5%, a cap
of 3 answered 1 of 4 keys where 8 answered 4 of 4 (kvpress, uncapped: 4 of 4). A stored
`CompressedContext` holds exactly the sum of its layers whatever the cap, and an engine built for one
(`LLM.ask`) sizes each layer to its own count; a serving slot under a per-layer policy is allocated
for its fullest layer, so lower `layer_cap` where running slots, not stored contexts, bound memory.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from longserve.errors import InvalidParameterError
from longserve.kv.policies.base import Policy
from longserve.kv.policies.wrapper import PolicyWrapper

SCHEDULES = ("global", "pyramid")
PYRAMID_BETA = 20  # PyramidKV's default: the top layer's selected share = bottom's / ~40


def fit_counts(desired: list[float], total: int, cap: int) -> list[int]:
    """Integers close to `desired`, each in [0, cap], summing to `total` (<= cap * len): entries above
    the cap are clipped and the rest scaled up to absorb the difference, then rounded by largest
    remainder."""
    n = len(desired)
    total = min(total, cap * n)
    want = [max(0.0, d) for d in desired]
    fixed: dict[int, float] = {}
    while True:  # water-filling: at most n rounds, each fixes one more layer at the cap
        free = [i for i in range(n) if i not in fixed]
        left = total - sum(fixed.values())
        mass = sum(want[i] for i in free)
        scale = left / mass if mass > 0 else 0.0
        share = {i: (want[i] * scale if mass > 0 else left / len(free)) for i in free}
        over = [i for i in free if share[i] > cap]
        if not over:
            break
        for i in over:
            fixed[i] = cap
    real = [fixed.get(i, share.get(i, 0.0)) for i in range(n)]
    counts = [min(cap, math.floor(r)) for r in real]
    order = sorted(range(n), key=lambda i: real[i] - counts[i], reverse=True)
    short = total - sum(counts)
    for i in order:
        if short <= 0:
            break
        if counts[i] < cap:
            counts[i] += 1
            short -= 1
    return counts


class LayerBudgetPolicy(PolicyWrapper):
    options: ClassVar[tuple[str, ...]] = ("layer_budgets", "layer_cap")
    layer_adaptive: ClassVar[bool] = True  # shadows the wrapper's delegating property

    def __init__(self, policy: Policy, layer_budgets: str = "global", layer_cap: float = 8.0):
        if layer_budgets not in SCHEDULES:
            raise InvalidParameterError(
                f"layer_budgets must be one of {', '.join(SCHEDULES)} (or 'uniform'), got {layer_budgets!r}"
            )
        if policy.layer_adaptive:
            raise InvalidParameterError("per-layer budgets cannot wrap a policy that already has them")
        if not policy.compresses or policy.decode.accumulates_scores or policy.sparse_decode:
            raise InvalidParameterError(
                f"per-layer budgets are not supported by policy '{policy.name}': it must evict at "
                "prefill, then append or ring (not H2O's score-driven or Quest's page-driven decode)"
            )
        if layer_budgets == "global" and not policy.has_scoring_pass:
            raise InvalidParameterError(
                f"layer_budgets='global' needs every layer's scores before any layer is pruned (a "
                f"scoring pass, as kvzip runs); policy '{policy.name}' scores layer by layer: use "
                "layer_budgets='pyramid'"
            )
        if not layer_cap >= 1:
            raise InvalidParameterError(f"layer_cap must be >= 1 (times the uniform budget), got {layer_cap}")
        super().__init__(policy)
        self.layer_budgets, self.layer_cap = layer_budgets, float(layer_cap)

    def _forced(self, prompt_len: int) -> int:
        """Tokens every layer keeps whatever the schedule (sinks + recent window)."""
        return min(prompt_len, self.n_sink + self.window)

    def max_kept(self, prompt_len: int) -> int:
        kept, forced = self.kept(prompt_len), self._forced(prompt_len)
        return min(prompt_len, forced + math.floor(self.layer_cap * (kept - forced)))

    def capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        extra = self.max_kept(prompt_len) - self.kept(prompt_len)
        return self.policy.capacity(prompt_len, max_new_tokens) + extra

    def layer_kept(
        self, prompt_len: int, layers: list[int], pass_scores: list[torch.Tensor | None] | None
    ) -> dict[int, int] | None:
        kept, forced = self.kept(prompt_len), self._forced(prompt_len)
        share = kept - forced  # selected tokens per layer under the uniform budget
        if share <= 0 or kept >= prompt_len or not layers:
            return None
        cap = self.max_kept(prompt_len) - forced
        if self.layer_budgets == "pyramid":
            low = share / PYRAMID_BETA
            high = 2 * share - low
            step = (high - low) / max(1, len(layers) - 1)
            desired = [high - i * step for i in range(len(layers))]
        else:
            desired = self._global_shares(prompt_len, layers, pass_scores, share)
        counts = fit_counts(desired, share * len(layers), cap)
        return {layer: forced + c for layer, c in zip(layers, counts, strict=True)}

    def _global_shares(self, prompt_len, layers, pass_scores, share) -> list[float]:
        """Each layer's (fractional) token count in one top-k over all layers' selectable entries."""
        if pass_scores is None:
            raise InvalidParameterError("layer_budgets='global' needs the policy's scoring-pass scores")
        end = prompt_len - min(self.window, prompt_len)
        middle = [pass_scores[layer][:, self.n_sink : end].float() for layer in layers]  # [Hkv, M]
        heads = middle[0].shape[0]
        flat = torch.cat([m.flatten() for m in middle])
        n = min(flat.numel(), share * heads * len(layers))
        top = flat.topk(n).indices
        bounds = torch.tensor([m.numel() for m in middle]).cumsum(0)
        per_layer = torch.bincount(torch.bucketize(top, bounds, right=True), minlength=len(layers))
        return [c / heads for c in per_layer.tolist()]
