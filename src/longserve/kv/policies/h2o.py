"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention + a recent window; during decode
each new token evicts the lowest-scored old token that is not recent."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from longserve.kv.policies.base import Policy, ScoreInputs
from longserve.kv.policies.strategy import EVICT, DecodeStrategy


@dataclass
class H2OPolicy(Policy):
    name: ClassVar[str] = "h2o"
    decode: ClassVar[DecodeStrategy] = EVICT
    window: int = 32

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.attention_mass()  # attention received from every query in the chunk
