"""SAGE-KV (Wang et al., 2025): one-time token- and head-level top-k after prefill, scored by the last
prompt token's query; sinks + top-k middle + recent window (the last token included) are kept, and
the recent window slides during decode."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from longserve.kv.policies.base import Policy, ScoreInputs
from longserve.kv.policies.snapkv import pool_scores
from longserve.kv.policies.strategy import RING, DecodeStrategy


@dataclass
class SagePolicy(Policy):
    name: ClassVar[str] = "sage"
    decode: ClassVar[DecodeStrategy] = RING
    n_sink: int = 4
    window: int = 32
    kernel: int = 7  # one query's scores are spiky: smoothing keeps a hit's neighbours (whole numbers, names)
    pooling: str = "max"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        scores = inputs.attention(1)[:, 0]  # [Hkv, L]: each KV head picks its own tokens
        return pool_scores(scores, self.kernel, self.pooling)
