"""Shared tiny models and reference runs for the speculative-decoding tests."""

from __future__ import annotations

import copy
import functools

import torch

from longserve.engine.sampler import SamplingParams
from longserve.llm import LLM
from longserve.loader import LoadedModel
from tests.tiny import tiny_loaded


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@functools.cache
def llm(family: str = "llama", seed: int = 0, **overrides) -> LLM:
    return LLM(loaded=tiny_loaded(family, seed=seed, **overrides)[0], progress=False)


@functools.cache
def perturbed(family: str = "llama", noise: float = 0.3) -> LLM:
    """The target with noisy weights: agrees with it often but not always (partial acceptance)."""
    base = llm(family).loaded
    model = copy.deepcopy(base.model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * noise)
    loaded = LoadedModel(f"{base.name}-noisy", None, model, base.tokenizer, base.args, base.eos_ids)
    return LLM(loaded=loaded, progress=False)


def plain_run(target: LLM, ids: list[int], n: int, policy, stop: list[str] | None = None):
    engine = target.engine(1, policy.capacity(len(ids), n))
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=n, ignore_eos=True, stop=stop or []), policy)
    while engine.has_unfinished():
        engine.step()
    return seq


def plain_greedy(target: LLM, ids: list[int], n: int, policy) -> list[int]:
    return plain_run(target, ids, n, policy).output_ids
