"""The base every KV policy extends: a policy only *scores* cached tokens; this class does the pruning.

One policy = one small file with a `@dataclass` subclass that overrides `score()` (kvpress style),
plus one line in `longserve.kv.policies.REGISTRY`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from longserve.errors import InvalidParameterError


@dataclass
class ScoreInputs:
    """What a scorer may look at for one layer of one sequence at the end of prefill."""

    layer: int
    queries: torch.Tensor  # [Hq, Tq, D] post-RoPE queries of the last prefill chunk (the prompt's tail)
    keys: torch.Tensor  # [Hkv, L, D] post-RoPE keys of the whole prompt
    values: torch.Tensor  # [Hkv, L, D]
    positions: torch.Tensor  # [L] original positions
    scaling: float
    seed: int = 0

    @property
    def group_size(self) -> int:
        return self.queries.shape[0] // self.keys.shape[0]

    def attention(self, n_queries: int | None = None) -> torch.Tensor:
        """Softmax attention of the last `n_queries` prompt queries over all keys, causally masked,
        GQA-aggregated to KV heads (mean over each group): [Hkv, n_queries, L].

        Aggregating instead of expanding keeps KV heads shared between query heads, so the
        selection never inflates memory to query-head count."""
        q = self.queries if n_queries is None else self.queries[:, -n_queries:]
        hq, tq, d = q.shape
        hkv, length, _ = self.keys.shape
        qg = q.reshape(hkv, self.group_size * tq, d)
        logits = (qg @ self.keys.transpose(1, 2)).float() * self.scaling  # [Hkv, G*Tq, L]
        dev = self.keys.device
        q_pos = torch.arange(length - tq, length, device=dev).repeat(self.group_size)
        causal = torch.arange(length, device=dev)[None, :] <= q_pos[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
        probs = logits.softmax(-1).view(hkv, self.group_size, tq, length)
        return probs.mean(1)


@dataclass
class Policy:
    """Budgets: `budget` tokens (sinks + selected + recent window), or `ratio` of the prompt.

    `decode` says what happens once generation starts:
      - "append": the cache grows by one token per step (capacity = kept prompt + max_new_tokens);
      - "ring": a fixed-size cache; new tokens overwrite the oldest token of the recent region, so a
        sequence never holds more than its budget (StreamingLLM, SAGE-KV, SnapStream);
      - "evict": a fixed-size cache; each new token replaces the lowest-scored old one (H2O).

    `head_adaptive` (AdaKV, Feng et al., 2024): instead of `budget` tokens per KV head, one top-k over
    all heads of a layer keeps `budget * kv_heads` entries, so heads whose attention is spread keep
    more tokens and focused heads fewer. The bytes held are the same as the uniform budget's; each
    head is still guaranteed `head_floor` of its uniform share of the selected (middle) tokens.
    """

    budget: int | None = None
    ratio: float | None = None
    window: int = 32  # recent tokens always kept
    n_sink: int = 0  # first tokens always kept
    head_adaptive: bool = False
    head_floor: float = 0.2

    name: ClassVar[str] = "base"
    decode: ClassVar[str] = "append"
    compresses: ClassVar[bool] = True
    sparse_decode: ClassVar[bool] = False  # decode reads a query-selected subset of the cache (Quest)

    def __post_init__(self) -> None:
        if self.head_adaptive and (not self.compresses or self.decode == "evict" or not self.window):
            raise InvalidParameterError(
                f"head_adaptive budgets are not supported by policy '{self.name}': it "
                "must evict at prefill, then append or ring over a recent window > 0"
            )
        if not self.compresses:
            return
        if (self.budget is None) == (self.ratio is None):
            raise InvalidParameterError(f"policy '{self.name}' needs exactly one of budget= or ratio=")
        if self.budget is not None and self.budget <= 0:
            raise InvalidParameterError(f"kv budget must be > 0 tokens, got {self.budget}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise InvalidParameterError(f"kv ratio must be in (0, 1], got {self.ratio}")
        if self.window < 0 or self.n_sink < 0:
            raise InvalidParameterError("window and n_sink must be >= 0")
        if not 0 <= self.head_floor <= 1:
            raise InvalidParameterError(f"head_floor must be in [0, 1], got {self.head_floor}")
        if self.budget is not None and self.window + self.n_sink > self.budget:
            raise InvalidParameterError(
                f"window ({self.window}) + sinks ({self.n_sink}) exceed the kv budget ({self.budget}); "
                "lower --kv-window or raise --kv-budget"
            )

    # ---- sizes -------------------------------------------------------------------------------
    def kept(self, prompt_len: int) -> int:
        """Tokens kept after prefill; a prompt within budget is never compressed."""
        if not self.compresses:
            return prompt_len
        target = self.budget if self.budget is not None else max(1, math.ceil(self.ratio * prompt_len))
        target = max(target, min(prompt_len, self.window + self.n_sink))
        return min(prompt_len, target)

    def capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        """Physical cache slots one sequence needs: the static shape a scheduler can plan with."""
        if self.decode == "append":
            return self.kept(prompt_len) + max_new_tokens
        fixed = self.budget if self.budget is not None else self.kept(prompt_len)
        return max(1, min(fixed, prompt_len + max_new_tokens))

    def protected_prefix(self, kept: int) -> int:
        """How many leading cache entries a ring never overwrites (sinks + selected middle)."""
        return max(self.n_sink, kept - self.window)

    # ---- selection ---------------------------------------------------------------------------
    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """[Hkv, L] importance of each cached token; higher is kept. Subclasses override."""
        raise NotImplementedError

    def select(self, inputs: ScoreInputs, n_keep: int) -> torch.Tensor:
        """Indices [Hkv, n_keep] of tokens to keep, in original order per head."""
        hkv, length, _ = inputs.keys.shape
        scores = self.score(inputs).float()
        scores = scores.clone() if scores.shape == (hkv, length) else scores.expand(hkv, length).clone()
        forced = torch.zeros(length, dtype=torch.bool, device=inputs.keys.device)
        forced[: self.n_sink] = True
        if self.window:
            forced[max(0, length - self.window) :] = True
        scores[:, forced] = float("inf")
        keep = scores.topk(n_keep, dim=-1).indices
        return keep.sort(dim=-1).values

    def select_adaptive(self, inputs: ScoreInputs, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """AdaKV: (head, token) index pairs of the `n_keep * kv_heads` entries one layer keeps.

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
