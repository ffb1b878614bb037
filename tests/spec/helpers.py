"""Shared tiny models and reference runs for the speculative-decoding tests."""

from __future__ import annotations

import copy
import functools

import torch

from longserve.engine.sampler import SamplingParams
from longserve.kv.policies import make_policy
from longserve.llm import LLM
from longserve.loader import LoadedModel
from longserve.spec.rollback import SpeculativeSlot
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


@torch.inference_mode()
def assert_verify_is_plain_decoding(target: LLM, ids: list[int], rounds: int, k: int) -> None:
    """Greedy from `ids`: each round decodes `k` tokens one by one, rolls them back, verifies the same
    tokens as one block, and asserts the block's logits are the bits of the one-by-one logits."""
    engine = target.engine(1, len(ids) + rounds * k + 8)
    seq = engine.add_request(
        ids, SamplingParams(max_new_tokens=rounds * k + 4, ignore_eos=True), make_policy("full")
    )
    engine.scheduler.admit()
    token = int(engine.runner.prefill(seq, len(ids)).argmax())
    slot = SpeculativeSlot(target.loaded.model, engine.pool, seq.slot)
    assert slot.exact
    for _ in range(rounds):
        tokens, sequential = [token], []
        for _ in range(k):
            sequential.append(slot.forward([tokens[-1]])[0])
            tokens.append(int(sequential[-1].argmax()))
        slot.commit(0)
        block = slot.forward(tokens[:k])
        assert all(torch.equal(block[i], sequential[i]) for i in range(k))
        slot.commit(k)
        token = tokens[k]
