"""Exact speculative decoding in bf16: a verified token's logits are the bits of target-only decoding.

The model is tiny except for Qwen2.5-0.5B's widths (hidden 896, MLP 4864): a bf16 1-row product over
that many inputs takes a GEMV path that rounds differently from the rows of a k-row GEMM, which is what
made speculative greedy output differ from the target's own."""

import functools

import torch
import torch.nn.functional as F

from longserve.kv.policies import make_policy
from longserve.llm import LLM
from longserve.spec import SpeculativeDecoder
from tests.spec.helpers import assert_verify_is_plain_decoding, plain_greedy, prompt
from tests.tiny import tiny_loaded


@functools.cache
def wide_bf16(seed: int = 0, noise: float = 0.0) -> LLM:
    loaded, _ = tiny_loaded(
        "qwen2",
        seed=seed,
        hidden_size=896,
        intermediate_size=4864,
        num_attention_heads=14,
        num_hidden_layers=2,
    )
    if noise:
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * noise)
    loaded.model.to(torch.bfloat16).fuse()
    return LLM(loaded=loaded, progress=False)


def test_padded_rows_are_the_rows_of_any_wider_product():
    """The premise of `row_invariant`: rows 2..k of a bf16 GEMM never depend on the row count."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 4864, generator=gen) * 0.02).bfloat16()
    x = torch.randn(6, 4864, generator=gen).bfloat16()
    wide = F.linear(x, w)
    for i in range(6):
        assert torch.equal(F.linear(x[i : i + 1].repeat(2, 1), w)[0], wide[i])


def test_bf16_models_are_row_invariant_and_fp32_models_are_not():
    assert wide_bf16().loaded.model.row_invariant
    loaded, _ = tiny_loaded("llama")
    assert not LLM(loaded=loaded, progress=False).loaded.model.row_invariant


def test_verified_block_logits_are_the_bits_of_sequential_decoding():
    assert_verify_is_plain_decoding(wide_bf16(), prompt(1, 40), rounds=4, k=5)


def test_bf16_speculative_greedy_output_is_the_targets():
    target, draft = wide_bf16(), wide_bf16(noise=0.1)
    full = make_policy("full")
    for seed in range(3):
        ids = prompt(seed, 12 + 7 * seed)
        expected = plain_greedy(target, ids, 32, full)
        for k in (2, 4):
            out = SpeculativeDecoder(target, draft, k=k).generate(ids, max_new_tokens=32, ignore_eos=True)
            assert out.token_ids == expected, (seed, k)
