"""Random baseline: what any method must beat."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from longserve.kv.policies.base import Policy, ScoreInputs


@dataclass
class RandomPolicy(Policy):
    name: ClassVar[str] = "random"
    window: int = 0

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(inputs.seed * 1009 + inputs.layer)
        return torch.rand(inputs.keys.shape[:2], generator=gen).to(inputs.keys.device)  # same draws anywhere
