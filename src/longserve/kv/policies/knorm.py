"""Key-norm baseline (Devoto et al., 2024): keys with a low L2 norm tend to draw high attention."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from longserve.kv.policies.base import Policy, ScoreInputs


@dataclass
class KNormPolicy(Policy):
    name: ClassVar[str] = "knorm"
    window: int = 0

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)
