"""SnapKV (Li et al., 2024): the last `window` prompt queries vote for the keys they attend to."""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from longserve.errors import InvalidParameterError
from longserve.kv.policies.base import Policy, ScoreInputs


def pool_scores(scores: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    """Smooth [H, L] scores along the sequence so that neighbours of a hit survive with it."""
    if kernel <= 1:
        return scores
    pad = kernel // 2
    if mode == "max":
        return F.max_pool1d(scores[:, None], kernel, stride=1, padding=pad)[:, 0]
    return F.avg_pool1d(scores[:, None], kernel, stride=1, padding=pad, count_include_pad=False)[:, 0]


@dataclass
class SnapKVPolicy(Policy):
    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in ("max", "avg"):
            raise InvalidParameterError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        if self.window <= 0:
            raise InvalidParameterError("snapkv needs an observation window >= 1")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        n_obs = min(self.window, inputs.queries.shape[1])
        votes = inputs.attention_mass(n_obs)  # [Hkv, L]
        return pool_scores(votes, self.kernel, self.pooling)
