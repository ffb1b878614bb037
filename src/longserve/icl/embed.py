"""Sentence embeddings from any zoo model: its last hidden states, mean-pooled and normalized.

No separate embedding model is needed (none ships offline); the served model or a small zoo model
gives embeddings good enough to rank demonstrations and to de-duplicate playbook bullets.
"""

from __future__ import annotations

import torch

from longserve.distill.teacher import FullAttention


class Embedder:
    """`Embedder(llm)(texts)` -> [N, D] unit vectors; each text is embedded once and cached."""

    def __init__(self, llm, max_tokens: int = 256):
        self.llm, self.max_tokens = llm, max_tokens
        self.cache: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def _one(self, text: str) -> torch.Tensor:
        model = self.llm.loaded.model
        ids = self.llm.tokenizer.encode(text, add_special_tokens=True)[: self.max_tokens] or [0]
        positions = torch.arange(len(ids))[None]
        hidden = model.hidden_states(torch.tensor([ids]), positions, FullAttention(model.args, positions))
        states = hidden[0, 1:] if len(ids) > 1 else hidden[0]  # the first token is an attention sink: outlier
        return torch.nn.functional.normalize(states.float().mean(0), dim=-1)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        for text in texts:
            if text not in self.cache:
                self.cache[text] = self._one(text)
        return torch.stack([self.cache[t] for t in texts]) if texts else torch.empty(0)
