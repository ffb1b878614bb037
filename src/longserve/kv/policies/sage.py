"""SAGE-KV (Wang et al., 2025): one-time token- and head-level top-k after prefill, scored by the
prompt's last queries; sinks + top-k middle + recent window (the last token included) are kept, and
the recent window slides during decode (a ring over it: the cache never grows).

The paper scores with the last token's query alone. Under a chat template that token is the assistant
header's newline, and one query is a noisy vote: on `make demo` (SmolLM2-135M, 1960 tokens, budget 256)
the single-query selection drops the answer's surname, the append-only variant answers "Ilse-Marie
Vélinc", and with the ring (which overwrites the question's tokens in the recent window as the answer
grows) the answer degenerates into "Ilse V. V. V. V.". Pooling wider (kernel 15) or maxing over the
query group does not help; the mean attention of the last 4 or 8 queries answers "Ilse Varga." (all
of them template tokens: it is the averaging, not the question's wording, that finds the name). So
`n_queries` defaults to 8; `n_queries=1` is the paper's rule.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from longserve.errors import InvalidParameterError
from longserve.kv.policies.base import Policy, ScoreInputs
from longserve.kv.policies.snapkv import pool_scores
from longserve.kv.policies.strategy import RING, DecodeStrategy


@dataclass
class SagePolicy(Policy):
    name: ClassVar[str] = "sage"
    decode: ClassVar[DecodeStrategy] = RING
    n_sink: int = 4
    window: int = 32
    kernel: int = 7  # scores are spiky: smoothing keeps a hit's neighbours (whole numbers, names)
    pooling: str = "max"
    n_queries: int = 8  # the last prompt queries that vote (1 = the paper's last token only)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_queries < 1:
            raise InvalidParameterError(f"sage needs n_queries >= 1, got {self.n_queries}")
        if self.pooling not in ("max", "avg"):
            raise InvalidParameterError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        n = min(self.n_queries, inputs.queries.shape[1])
        scores = inputs.attention_mass(n)  # [Hkv, L]: each KV head picks its own tokens
        return pool_scores(scores, self.kernel, self.pooling)
