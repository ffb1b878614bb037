"""StreamingLLM (Xiao et al., 2023): attention sinks + a sliding window of recent tokens."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from longserve.kv.policies.base import Policy, ScoreInputs
from longserve.kv.policies.strategy import RING, DecodeStrategy


@dataclass
class StreamingPolicy(Policy):
    name: ClassVar[str] = "streaming"
    decode: ClassVar[DecodeStrategy] = RING
    n_sink: int = 4
    window: int = 0  # everything but the sinks is "recent": see protected_prefix

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.positions.float()[None]  # newest first; sinks are forced by the base class

    def protected_prefix(self, kept: int) -> int:
        return min(self.n_sink, kept)
