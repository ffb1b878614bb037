"""`ScoreInputs.attention` computed in chunks of queries equals the one-shot [Hkv, G*Tq, L] softmax."""

from __future__ import annotations

import pytest
import torch

from longserve.kv.policies import ScoreInputs


def one_shot(inputs: ScoreInputs, n_queries: int | None) -> torch.Tensor:
    """The formula before chunking: all logits at once, causal by index, mean over each GQA group."""
    q = inputs.queries if n_queries is None else inputs.queries[:, -n_queries:]
    tq, d = q.shape[1], q.shape[2]
    hkv, length, _ = inputs.keys.shape
    g = inputs.group_size
    logits = (q.reshape(hkv, g * tq, d) @ inputs.keys.transpose(1, 2)).float() * inputs.scaling
    q_pos = torch.arange(length - tq, length).repeat(g)
    logits = logits.masked_fill(torch.arange(length)[None, :] > q_pos[:, None], float("-inf"))
    return logits.softmax(-1).view(hkv, g, tq, length).mean(1)


def make(hq=6, hkv=2, tq=23, length=57, d=8, dtype=torch.float32) -> ScoreInputs:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(hkv, length, d, generator=gen).to(dtype)
    return ScoreInputs(
        0, torch.randn(hq, tq, d, generator=gen).to(dtype), keys, keys.clone(), torch.arange(length), 0.3
    )


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 2 * 3 * 57 * 5, 64 << 20])  # 1 query, 5 queries, all
@pytest.mark.parametrize("n_queries", [None, 1, 7, 40])  # 40 > Tq: all of them
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_attention_matches_one_shot(monkeypatch, chunk_bytes, n_queries, dtype):
    inputs = make(dtype=dtype)
    monkeypatch.setattr(ScoreInputs, "chunk_bytes", chunk_bytes)
    ref = one_shot(inputs, n_queries)
    out = inputs.attention(n_queries)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(inputs.attention_mass(n_queries), ref.sum(1), atol=1e-5, rtol=1e-5)


def test_chunks_bound_the_logits(monkeypatch):
    """With a budget of 5 queries' logits, no matmul holds more than 5 queries' rows."""
    inputs = make()
    monkeypatch.setattr(ScoreInputs, "chunk_bytes", 4 * 2 * 3 * 57 * 5)
    seen = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(a.shape[1])
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    inputs.attention_mass()
    assert seen and max(seen) <= 3 * 5  # G * 5 query rows per KV head
    assert sum(seen) == 3 * 23
