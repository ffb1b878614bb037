"""Pick an expert for a prompt: rules first, then the nearest expert profile by embedding.

Profiles are each expert's description and labelled example prompts, embedded once with the router
model (a small resident model: the mean of its hidden states at `LAYER_FRACTION` of its depth). A prompt's
score for an expert is the mean cosine similarity of its `K` nearest profile texts of that expert (a
per-expert k-nearest-neighbour vote), after *centering*: the mean of all profile vectors is subtracted
from every vector first. Hidden states of a causal LM share a large common direction (every text looks
alike to cosine similarity without centering); removing it leaves what tells the experts apart.

How K, the layer and the centering were chosen: a leave-one-out sweep on the bench's 60 labelled
examples (`bench/coe_experts.toml`; never on its test prompts) over every layer of SmolLM2-135M, K in
{1, 3, 5}, centered or not. Centered states from about a third of the depth on scored 57-60/60, the first
quarter of the layers 48-53/60; 70% depth and K=3 sit inside that plateau, not on its best point.

When several experts score within `margin` of the best, a resident one wins: switching has a cost, and
a near-tie is no reason to pay it (the SN40L point: the memory tier is part of the routing decision).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from longserve.coe.experts import Expert

#: Nearest profile texts averaged per expert.
K = 3
#: Which hidden states embed a text: those after this fraction of the decoder layers.
LAYER_FRACTION = 0.7


@dataclass
class Route:
    expert: str
    reason: str  # "rule", "nearest", "resident within margin" or "only expert"
    scores: dict[str, float]


class HiddenStateEmbedder:
    """`embed(texts)` -> [N, D]: a text's mean hidden state (the first token, an attention sink, left
    out) after `LAYER_FRACTION` of the decoder layers of ``llm()``, a callable so that the model is
    fetched (and kept resident) per call rather than held here. Each text is embedded once."""

    def __init__(
        self, llm: Callable[[], object], layer_fraction: float = LAYER_FRACTION, max_tokens: int = 256
    ):
        self.llm, self.layer_fraction, self.max_tokens = llm, layer_fraction, max_tokens
        self.cache: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def _one(self, llm, text: str) -> torch.Tensor:
        from longserve.distill.teacher import FullAttention

        model = llm.loaded.model
        ids = llm.tokenizer.encode(text, add_special_tokens=True)[: self.max_tokens] or [0]
        positions = torch.arange(len(ids))[None]
        backend = FullAttention(model.args, positions)
        x = model.model.embed_tokens(torch.tensor([ids]))
        if model.args.gemma_style:
            x = x * torch.tensor(model.args.hidden_size**0.5, dtype=x.dtype)
        tables = model.rope(positions, x.dtype)
        depth = max(1, round(self.layer_fraction * model.args.n_layers))
        for layer, rope_index in list(zip(model.model.layers, model.layer_rope_index, strict=True))[:depth]:
            cos, sin = tables[rope_index]
            x = layer(x, cos, sin, backend)
        states = x[0, 1:] if len(ids) > 1 else x[0]
        return states.float().mean(0)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            llm = self.llm()  # outside inference mode: this may load the model (tensors that must not be
            for text in todo:  # inference tensors)
                self.cache[text] = self._one(llm, text)
        return torch.stack([self.cache[t] for t in texts])


class Router:
    def __init__(
        self,
        experts: list[Expert],
        embed: Callable[[list[str]], torch.Tensor],
        margin: float = 0.02,
        k: int = K,
        center: bool = True,
    ):
        self.experts, self.embed, self.margin, self.k = experts, embed, margin, k
        profiles = {e.name: embed(e.profile or [e.name]).float() for e in experts}
        everything = torch.cat(list(profiles.values()))
        # centering needs at least two distinct vectors (one minus its own mean is zero)
        self.center = (
            everything.mean(0) if center and len(everything) > 1 else torch.zeros_like(everything[0])
        )
        self.profiles = {name: self._unit(v) for name, v in profiles.items()}

    def _unit(self, vectors: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(vectors - self.center, dim=-1)

    def scores(self, prompt: str) -> dict[str, float]:
        """Per expert: the mean similarity of the prompt to that expert's `k` nearest profile texts."""
        query = self._unit(self.embed([prompt]).float())[0]
        out = {}
        for name, vectors in self.profiles.items():
            sims = vectors @ query
            out[name] = float(sims.topk(min(self.k, len(sims))).values.mean())
        return out

    def route(self, prompt: str, resident: Iterable[str] = ()) -> Route:
        for expert in self.experts:
            if expert.matches(prompt):
                return Route(expert.name, "rule", {})
        scores = self.scores(prompt)
        best = max(scores, key=scores.get)
        resident = set(resident)
        close = [n for n in scores if scores[n] >= scores[best] - self.margin and n in resident]
        if best not in resident and close:
            return Route(max(close, key=scores.get), "resident within margin", scores)
        return Route(best, "nearest", scores)
