"""SAGE-KV (Wang et al., 2025): one-time token- and head-level top-k after prefill, scored by the last
prompt token's query; sinks + top-k middle + recent window (the last token included) are kept, and
the recent window slides during decode."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from longserve.kv.policies.base import Policy, ScoreInputs


@dataclass
class SagePolicy(Policy):
    name: ClassVar[str] = "sage"
    decode: ClassVar[str] = "ring"
    n_sink: int = 4
    window: int = 32

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.attention(1)[:, 0]  # [Hkv, L]: each KV head picks its own tokens
