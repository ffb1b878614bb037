"""The mask-free prefill kernels against a straightforward masked softmax over [prefix; chunk]."""

from __future__ import annotations

import pytest
import torch

from longserve.kv import attention_kernels as kernels


def reference(q, k, v, pk, pv, q_pos, p_pos, scale, window=None):
    """fp32 softmax over every key each query may see (causal by position, inside the window)."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    keys = torch.cat([pk, k[0]], 1).float().repeat_interleave(g, 0)
    values = torch.cat([pv, v[0]], 1).float().repeat_interleave(g, 0)
    kp = torch.cat([p_pos[0], q_pos])[None, :]
    qp = q_pos[:, None]
    mask = kp <= qp
    if window:
        mask &= (qp - kp) < window
    logits = (q[0].float() @ keys.transpose(1, 2)) * scale
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ values)[None]


def inputs(hq, hkv, n_prefix, t, d=16, dtype=torch.float32, gap=0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = r(1, hq, t, d), r(1, hkv, t, d), r(1, hkv, t, d)
    pk, pv = r(hkv, n_prefix, d), r(hkv, n_prefix, d)
    p_pos = torch.arange(n_prefix).expand(hkv, n_prefix)
    # a gap between prefix and chunk (skipped tokens keep their original positions), then every
    # other chunk position skipped when gap > 0
    step = 2 if gap else 1
    q_pos = n_prefix + gap + torch.arange(t) * step
    return q, k, v, pk, pv, q_pos, p_pos


TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (14, 2)])
@pytest.mark.parametrize("n_prefix", [0, 1, 37])
def test_chunk_matches_masked_reference(dtype, heads, n_prefix):
    args = inputs(*heads, n_prefix, 29, dtype=dtype)
    out = kernels.chunk_attention(*args, scale=0.25)
    assert out.dtype == dtype and out.shape == args[0].shape
    ref = reference(*args, scale=0.25)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    old = kernels.masked_attention(*args, scale=0.25)
    torch.testing.assert_close(out.float(), old.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n_prefix", "t", "window", "gap"),
    [
        (40, 20, 64, 0),  # window longer than prefix + chunk: no mask at all
        (40, 20, 16, 0),  # window shorter than the prefix: it cuts into it
        (16, 50, 16, 0),  # chunk longer than the window: banded blocks, prefix only in the first
        (10, 33, 24, 3),  # positions with gaps: the cut is by position, not index
        (0, 45, 8, 0),  # no prefix, windowed causal
        (0, 7, 8, 0),  # no prefix, window never cuts
    ],
)
def test_sliding_window(dtype, n_prefix, t, window, gap):
    args = inputs(9, 3, n_prefix, t, dtype=dtype, gap=gap, seed=1)
    out = kernels.chunk_attention(*args, scale=0.3, window=window)
    ref = reference(*args, scale=0.3, window=window)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_windowed_ring_prefix_out_of_order():
    """A sliding layer's ring holds its prefix out of position order; only the positions matter."""
    q, k, v, pk, pv, q_pos, p_pos = inputs(4, 2, 12, 10, seed=2)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    pk, pv, p_pos = pk[:, perm], pv[:, perm], p_pos[:, perm]
    out = kernels.chunk_attention(q, k, v, pk, pv, q_pos, p_pos, 0.3, window=8)
    torch.testing.assert_close(
        out, reference(q, k, v, pk, pv, q_pos, p_pos, 0.3, window=8), atol=2e-5, rtol=2e-5
    )


def test_merge_weights_by_lse():
    """Two halves of the keys merged by LSE equal attention over all of them, and an empty part
    (lse -inf) has no weight."""
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    full = kernels.flash_lse(q, k, v, False, 0.5)[0]
    a, b = (
        kernels.flash_lse(q, k[:, :, :4], v[:, :, :4], False, 0.5),
        kernels.flash_lse(q, k[:, :, 4:], v[:, :, 4:], False, 0.5),
    )
    empty = (torch.full_like(q, 7.0), torch.full((1, 2, 5), float("-inf")))
    torch.testing.assert_close(kernels.merge([a, b, empty], q.dtype), full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_prefix_matches_masked_reference(dtype):
    """Head-adaptive prefix: each KV head sees only its own entries (one head holds none)."""
    hq, hkv, t, d = 6, 3, 11, 16
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, hq, t, d, generator=gen).to(dtype)
    k, v = (
        torch.randn(1, hkv, t, d, generator=gen).to(dtype),
        torch.randn(1, hkv, t, d, generator=gen).to(dtype),
    )
    heads = torch.tensor([0, 0, 1, 0, 1, 1, 1, 0, 0])  # head 2 keeps nothing
    pk, pv = (
        torch.randn(len(heads), d, generator=gen).to(dtype),
        torch.randn(len(heads), d, generator=gen).to(dtype),
    )
    out = kernels.flat_chunk_attention(q, k, v, pk, pv, heads, 0.25)
    g = hq // hkv
    ref = torch.empty(1, hq, t, d)
    for h in range(hq):
        kv = h // g
        sel = heads == kv
        keys = torch.cat([pk[sel], k[0, kv]]).float()
        values = torch.cat([pv[sel], v[0, kv]]).float()
        n = int(sel.sum())
        mask = torch.ones(t, n + t, dtype=torch.bool)
        mask[:, n:] = torch.ones(t, t, dtype=torch.bool).tril()
        logits = (q[0, h].float() @ keys.T * 0.25).masked_fill(~mask, float("-inf"))
        ref[0, h] = logits.softmax(-1) @ values
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_prefix_after_chunk_positions_stays_exact():
    """A prefix entry at or after the chunk's first position (not a layout prefill makes) falls back
    to the masked kernel rather than letting the chunk see it unmasked."""
    q, k, v, pk, pv, q_pos, p_pos = inputs(4, 2, 6, 5, seed=4)
    p_pos = p_pos.clone()
    p_pos[:, -1] = q_pos[2]  # visible to queries 2.. only
    out = kernels.chunk_attention(q, k, v, pk, pv, q_pos, p_pos, 0.3)
    torch.testing.assert_close(out, reference(q, k, v, pk, pv, q_pos, p_pos, 0.3), atol=2e-5, rtol=2e-5)
