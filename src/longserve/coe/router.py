"""Pick an expert for a prompt: rules first, then the nearest expert profile by embedding.

Profiles are each expert's description and example prompts, embedded once with the router model (the
mean-pooled hidden states of a small resident model). When several experts score within `margin` of
the best, a resident one wins: switching has a cost, and a near-tie is no reason to pay it (the
SN40L point: the memory tier is part of the routing decision).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from longserve.coe.experts import Expert


@dataclass
class Route:
    expert: str
    reason: str  # "rule", "nearest" or "resident within margin"
    scores: dict[str, float]


class Router:
    def __init__(
        self, experts: list[Expert], embed: Callable[[list[str]], torch.Tensor], margin: float = 0.02
    ):
        self.experts, self.embed, self.margin = experts, embed, margin
        self.profiles = {e.name: embed(e.profile or [e.name]) for e in experts}

    def route(self, prompt: str, resident: Iterable[str] = ()) -> Route:
        for expert in self.experts:
            if expert.matches(prompt):
                return Route(expert.name, "rule", {})
        query = self.embed([prompt])[0]
        scores = {name: float((vectors @ query).max()) for name, vectors in self.profiles.items()}
        best = max(scores, key=scores.get)
        resident = set(resident)
        close = [n for n in scores if scores[n] >= scores[best] - self.margin and n in resident]
        if best not in resident and close:
            return Route(max(close, key=scores.get), "resident within margin", scores)
        return Route(best, "nearest", scores)
