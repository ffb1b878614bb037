"""The base every KV policy extends: a policy only *scores* cached tokens; this class does the pruning.

One policy = one small file with a `@dataclass` subclass that overrides `score()` (kvpress style),
plus one line in `longserve.kv.policies.REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longserve.errors import InvalidParameterError
from longserve.kv.policies.strategy import APPEND, DecodeStrategy


def rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over the last dimension (cos/sin [..., D] broadcast)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class ScoringChunk:
    """Tokens a scoring pass runs right after the prompt (`Policy.scoring_pass`); their attention
    scores prompt entries `[start, end)`, normalised over the first `n_sink` entries, those, and the
    chunk's own tokens."""

    ids: list[int]
    start: int
    end: int
    n_sink: int = 0


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
    pass_scores: torch.Tensor | None = None  # [Hkv, L] from the policy's scoring pass (KVzip), if any
    inv_freq: torch.Tensor | None = None  # [D/2] this layer's RoPE inverse frequencies, when known

    def rotate(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Post-RoPE vectors x [..., T, D] moved by `offsets` [T] positions (RoPE's rotations compose:
        R(a) R(b) = R(a + b)), the half-split layout of `model.transformer.apply_rope`."""
        if self.inv_freq is None:
            raise InvalidParameterError(
                "this scorer needs the model's RoPE frequencies, which this path lacks"
            )
        angles = offsets.to(self.inv_freq)[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], -1)
        return rotate_by(x, angles.cos(), angles.sin())

    @property
    def group_size(self) -> int:
        return self.queries.shape[0] // self.keys.shape[0]

    #: fp32 logits one chunk of queries may hold ([Hkv, G*chunk, L]; its softmax takes as much again):
    #: the scores never materialize [Hkv, G*Tq, L] for a long chunk (H2O reads every query of it)
    chunk_bytes: ClassVar[int] = 64 << 20

    def attention(self, n_queries: int | None = None) -> torch.Tensor:
        """Softmax attention of the last `n_queries` prompt queries over all keys, causally masked,
        GQA-aggregated to KV heads (mean over each group): [Hkv, n_queries, L].

        Aggregating instead of expanding keeps KV heads shared between query heads, so the
        selection never inflates memory to query-head count."""
        tq = self._tail(n_queries).shape[1]
        out = torch.empty(
            self.keys.shape[0], tq, self.keys.shape[1], device=self.keys.device, dtype=torch.float32
        )
        for start, end, probs in self._attention_chunks(n_queries):
            out[:, start:end] = probs
        return out

    def attention_mass(self, n_queries: int | None = None) -> torch.Tensor:
        """`attention(n_queries).sum(1)` ([Hkv, L]: the attention each key receives) without holding
        the [Hkv, n_queries, L] probabilities: summed chunk by chunk of queries."""
        total = torch.zeros(
            self.keys.shape[0], self.keys.shape[1], device=self.keys.device, dtype=torch.float32
        )
        for _, _, probs in self._attention_chunks(n_queries):
            total += probs.sum(1)
        return total

    def _tail(self, n_queries: int | None) -> torch.Tensor:
        return self.queries if n_queries is None else self.queries[:, -n_queries:]

    def _attention_chunks(self, n_queries: int | None):
        """(start, end, [Hkv, end - start, L] probabilities) per chunk of the last `n_queries` queries."""
        q = self._tail(n_queries)
        tq, d = q.shape[1], q.shape[2]
        hkv, length, _ = self.keys.shape
        g, dev = self.group_size, self.keys.device
        step = max(1, self.chunk_bytes // (4 * hkv * g * length))
        keys_t = self.keys.transpose(1, 2)
        for start in range(0, tq, step):
            end = min(start + step, tq)
            qg = q[:, start:end].reshape(hkv, g * (end - start), d)
            logits = (qg @ keys_t).float() * self.scaling  # [Hkv, G*chunk, L]
            q_pos = torch.arange(length - tq + start, length - tq + end, device=dev).repeat(g)
            logits.masked_fill_(torch.arange(length, device=dev)[None, :] > q_pos[:, None], float("-inf"))
            yield start, end, logits.softmax(-1).view(hkv, g, end - start, length).mean(1)


@dataclass
class Policy:
    """Budgets: `budget` tokens (sinks + selected + recent window), or `ratio` of the prompt.

    What a slot does once generation starts is the class's `decode` strategy (`strategy.py`: append,
    ring, evict). Behaviour that is not scoring is declared, not switched on by flags: `decode`,
    `compresses`, `sparse_decode`, `head_adaptive` (true only for the `AdaKVPolicy` wrapper).
    """

    budget: int | None = None
    ratio: float | None = None
    window: int = 32  # recent tokens always kept
    n_sink: int = 0  # first tokens always kept

    name: ClassVar[str] = "base"
    decode: ClassVar[DecodeStrategy] = APPEND
    compresses: ClassVar[bool] = True
    sparse_decode: ClassVar[bool] = False  # decode reads a query-selected subset of the cache (Quest)
    head_adaptive: ClassVar[bool] = False  # slots keep a flat (head, token) layout (AdaKV)
    layer_adaptive: ClassVar[bool] = False  # layers keep different token counts (`LayerBudgetPolicy`)
    has_scoring_pass: ClassVar[bool] = False  # `scoring_pass` runs extra tokens over the prompt (KVzip)

    def __post_init__(self) -> None:
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
        if not self.decode.fixed_size:
            return self.kept(prompt_len) + max_new_tokens
        fixed = self.budget if self.budget is not None else self.kept(prompt_len)
        return max(1, min(fixed, prompt_len + max_new_tokens))

    def max_kept(self, prompt_len: int) -> int:
        """Tokens the fullest layer keeps after prefill: `kept` unless budgets differ per layer."""
        return self.kept(prompt_len)

    def layer_kept(
        self, prompt_len: int, layers: list[int], pass_scores: list[torch.Tensor | None] | None
    ) -> dict[int, int] | None:
        """Tokens each of `layers` (the global-attention layers) keeps after prefill, or None: every
        layer keeps `kept(prompt_len)`."""
        return None

    def protected_prefix(self, kept: int) -> int:
        """How many leading cache entries a ring never overwrites (sinks + selected middle)."""
        return max(self.n_sink, kept - self.window)

    # ---- identity ----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Name + parameters: what a stored context records; `make_policy(**describe())` rebuilds it."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> Policy:
        """This policy with some parameters changed, validated again; a wrapper keyword
        (`head_adaptive=True`) wraps it, as `make_policy` does."""
        from longserve.kv.policies import REGISTRY, make_policy  # the registry imports this module

        if REGISTRY.get(self.name) is type(self):
            return make_policy(**(self.describe() | changes))
        return dataclasses.replace(self, **changes)

    # ---- selection ---------------------------------------------------------------------------
    def scoring_pass(self, prompt_ids: list[int], tokenizer: Any) -> list[ScoringChunk] | None:
        """Extra tokens to run over the uncompressed prompt before selecting (their scores reach
        `score()` as `inputs.pass_scores`); None, the default: score from the prompt's own queries."""
        return None

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
