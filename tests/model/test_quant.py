"""Weight-only int8/int4 linears: error bounds against the dequantized reference and the dense weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longserve.errors import InvalidParameterError
from longserve.llm import LLM
from longserve.model.quant import Int4Linear, Int8Linear, int4_group, quantize, weight_bytes
from tests.tiny import tiny_loaded


def _linear(n: int = 96, k: int = 128, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(n, 1) * 4)  # rows of different magnitude: per-row scales matter
    return lin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_matches_its_dequantized_weight(kind, dtype):
    """The kernel computes x @ dequant(W)^T: relative to the output's max, <= 1e-5 with fp32 activations
    (summation order only) and <= 1e-2 in bf16 (the output is rounded to 8 significant bits: 2^-8 = 0.4%,
    plus accumulation)."""
    lin = _linear()
    before = lin.weight.detach().clone()
    q = Int8Linear(lin, dtype) if kind == "int8" else Int4Linear(lin, dtype, 32)
    assert torch.equal(lin.weight, before)  # quantizing reads the dense weight, never rounds it in place
    x = torch.randn(2, 5, 128).to(dtype)
    ref = x.float() @ q.weight.float().t() + lin.bias.to(dtype).float()
    out = q(x)
    assert out.shape == (2, 5, 96) and out.dtype == dtype
    assert _rel(out, ref) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_int8_is_within_half_a_step_of_the_dense_weight():
    lin = _linear(bias=False)
    q = Int8Linear(lin, torch.float32)
    step = lin.weight.abs().amax(dim=1, keepdim=True) / 127
    err = (q.weight - lin.weight).abs()
    assert (err <= step / 2 + 1e-7).all()
    assert q.qweight.dtype == torch.int8 and q.qweight.nbytes == lin.weight.numel()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_is_within_half_a_step_of_the_dense_weight_per_group(group):
    lin = _linear(bias=False)
    q = Int4Linear(lin, torch.float32, group)
    w = lin.weight.detach().reshape(96, -1, group)
    step = (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15
    err = (q.weight.reshape(96, -1, group) - w).abs()
    assert (err <= step / 2 + 1e-6).all()
    assert q.packed.nbytes == lin.weight.numel() // 2  # two weights per byte


def test_int4_recovers_weights_that_were_already_on_a_4bit_grid():
    """A GGUF Q4_1-style block (w = d * q + m, q in 0..15, 32 per block) comes back exactly."""
    torch.manual_seed(1)
    n, k = 64, 128
    q = torch.randint(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # the block's min and max are on the grid, as a min-max quantizer puts them
    d, m = torch.rand(n, k // 32, 1) * 0.01, torch.randn(n, k // 32, 1) * 0.01
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_((d * q + m).reshape(n, k))
    torch.testing.assert_close(Int4Linear(lin, torch.float32, 32).weight, lin.weight, atol=1e-6, rtol=1e-5)


def test_int4_pads_rows_to_the_kernels_multiple_of_16():
    lin = _linear(n=37, bias=True)
    q = Int4Linear(lin, torch.float32, 32)
    x = torch.randn(3, 128)
    assert q(x).shape == (3, 37) and q.weight.shape == (37, 128)
    assert _rel(q(x), x @ q.weight.t() + lin.bias) <= 1e-5


def test_int4_group_falls_back_to_one_that_divides():
    assert int4_group(576, 128) == 64  # SmolLM2's hidden size
    assert int4_group(1536, 32) == 32
    with pytest.raises(InvalidParameterError, match="divides"):
        int4_group(100, 32)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_model_stays_close_and_serves(kind):
    loaded, _ = tiny_loaded("qwen2")  # q/k/v bias
    loaded.model.to(torch.bfloat16)
    dense = LLM(loaded=loaded, progress=False)
    before = weight_bytes(loaded.model)
    prompt = list(range(1, 30))
    dense_out = dense.generate(prompt, max_new_tokens=6)[0]
    dense_fingerprint = dense.fingerprint
    ids = torch.tensor([prompt])
    from longserve.kv.attention import PrefillBackend
    from longserve.kv.cache import KVPool
    from longserve.kv.policies import FullPolicy

    def logits():
        pool = KVPool(loaded.args, 1, 64, dtype=torch.bfloat16)
        backend = PrefillBackend(pool, pool.allocate(FullPolicy()), torch.arange(len(prompt)))
        with torch.no_grad():
            return loaded.model(ids, torch.arange(len(prompt))[None], backend, last_only=False)

    ref = logits()
    llm = LLM(loaded=loaded, weights=kind, progress=False)
    assert llm.weights == kind and llm.dtype == torch.bfloat16
    assert not any(type(m) is nn.Linear for m in loaded.model.modules())
    assert all(layer.self_attn.qkv is None for layer in loaded.model.model.layers)
    assert weight_bytes(loaded.model) < before * (0.75 if kind == "int8" else 0.6)
    # tiny random layers: outputs within a few % of the logits' range, far from random
    assert _rel(logits(), ref) < (0.03 if kind == "int8" else 0.15)
    out = llm.generate(prompt, max_new_tokens=6)[0]
    assert len(out.token_ids) == len(dense_out.token_ids) == 6
    assert llm.fingerprint != dense_fingerprint  # a compressed context of one is refused by the other


def test_weights_and_dtype_are_checked_together():
    with pytest.raises(InvalidParameterError, match="weights must be one of auto, bf16, fp32, int8, int4"):
        LLM("no-such-model", weights="int3")
    with pytest.raises(InvalidParameterError, match="weights 'bf16' run with dtype bfloat16, not float32"):
        LLM("no-such-model", weights="bf16", dtype="float32")
    loaded, _ = tiny_loaded("llama")
    assert LLM(loaded=loaded, weights="fp32", progress=False).dtype == torch.float32


def test_quantize_refuses_dense_names():
    loaded, _ = tiny_loaded("llama")
    with pytest.raises(InvalidParameterError, match="int8 or int4"):
        quantize(loaded.model, "bf16")


def test_int4_packed_in_several_row_chunks_is_still_right():
    """4096 inputs: 256-row chunks, so 1000 (padded to 1008) rows are packed in 4 pieces."""
    lin = _linear(n=1000, k=4096, bias=False)
    q = Int4Linear(lin, torch.float32, 128)
    w = lin.weight.detach().reshape(1000, -1, 128)
    step = (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15
    assert ((q.weight.reshape(1000, -1, 128) - w).abs() <= step / 2 + 1e-6).all()
