"""Prefill attention kernels that avoid boolean masks (issue 18, part 3).

A later prefill chunk attends to the slot's cached prefix and to its own tokens. One SDPA call with a
boolean mask over [prefix; chunk] is correct but leaves PyTorch's CPU flash kernel on its slow masked
path (2.2x slower than `is_causal` at 4k). Every prefix entry precedes every new token, so the prefix
part needs no mask at all and the chunk part is plain causal attention: two unmasked flash calls,
merged exactly by their log-sum-exps. `aten._scaled_dot_product_flash_attention_for_cpu` returns the
LSE and handles GQA itself (KV head = query head // group, the `enable_gqa` layout), so K/V are
never repeated.

Sliding-window layers (Gemma3) still need their window. The mask is used only where the window
actually cuts into the keys, and then per block of queries: each block sees the prefix (if any of it
is still inside its window) and at most `window` chunk tokens before it, never the whole chunk.

On other devices the masked SDPA stays (`masked_attention`): the flash-for-CPU op is CPU-only and
the GPU kernels' costs differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """(out [B, Hq, T, D], lse [B, Hq, T] fp32). Causal is top-left aligned: only for T == L."""
    return _flash_cpu(q, k, v, 0.0, causal, scale=scale)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Exact softmax over the union of the parts' keys, from each part's (out, lse)."""
    if len(parts) == 1:
        return parts[0][0].to(dtype)
    lse = parts[0][1]
    for _, other in parts[1:]:
        lse = torch.logaddexp(lse, other)
    out = None
    for o, part_lse in parts:
        w = (part_lse - lse).exp()[..., None]  # -inf lse (no keys) gives weight 0
        out = o.float() * w if out is None else out.addcmul_(o.float(), w)
    return out.to(dtype)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    q_pos: torch.Tensor,
    p_pos: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """The single masked SDPA call over [prefix; chunk] (the path before issue 18; non-CPU devices)."""
    keys, values = torch.cat([pk, k[0]], 1), torch.cat([pv, v[0]], 1)
    kp = torch.cat([p_pos[0], q_pos])[None, :]
    qp = q_pos[:, None]
    mask = kp <= qp
    if window:
        mask &= (qp - kp) < window
    return F.scaled_dot_product_attention(
        q, keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=True
    )


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    q_pos: torch.Tensor,
    p_pos: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """One sequence's chunk: q [1, Hq, T, D], k/v [1, Hkv, T, D] (new tokens at increasing positions
    q_pos [T]) over the cached prefix pk/pv [Hkv, P, D] at p_pos [Hkv, P] (all before q_pos[0]),
    causally, and within `window` positions when given. Returns [1, Hq, T, D]."""
    n_prefix = pk.shape[1]
    if q.device.type != "cpu":
        if n_prefix == 0 and not window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return masked_attention(q, k, v, pk, pv, q_pos, p_pos, scale, window)
    first, last = int(q_pos[0]), int(q_pos[-1])
    if n_prefix and int(p_pos.max()) >= first:  # not the layout this path assumes: stay exact
        return masked_attention(q, k, v, pk, pv, q_pos, p_pos, scale, window)
    if window:
        oldest = int(p_pos.min()) if n_prefix else first
        if last - oldest >= window:  # the window cuts into the keys somewhere
            return _windowed(q, k, v, pk, pv, q_pos, p_pos, scale, window)
    parts = [flash_lse(q, k, v, True, scale)]
    if n_prefix:
        parts.append(flash_lse(q, pk[None], pv[None], False, scale))
    return merge(parts, q.dtype)


def _windowed(q, k, v, pk, pv, q_pos, p_pos, scale, window) -> torch.Tensor:
    """Sliding-window attention in query blocks of `window`: block [s, e) sees chunk keys from the
    first one inside the window of query s up to e, plus the prefix if part of it is still inside."""
    t = q.shape[2]
    pos = q_pos.tolist()
    p_max = int(p_pos.max()) if pk.shape[1] else None
    p_row = p_pos[0]
    outs = []
    for s in range(0, t, window):
        e = min(s + window, t)
        lo = int(torch.searchsorted(q_pos, pos[s] - window + 1))
        keys, values, kp = k[0, :, lo:e], v[0, :, lo:e], q_pos[lo:e]
        if p_max is not None and pos[s] - p_max < window:
            keys, values = torch.cat([pk, keys], 1), torch.cat([pv, values], 1)
            kp = torch.cat([p_row, kp])
        qp = q_pos[s:e, None]
        mask = (kp[None, :] <= qp) & ((qp - kp[None, :]) < window)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, s:e], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=True
            )
        )
    return torch.cat(outs, 2)


def flat_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    p_heads: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """A chunk over a head-adaptive prefix: a flat entry list pk/pv [E, D] with each entry's KV head
    p_heads [E]. Each KV head's query group attends, unmasked, to that head's entries (its G query
    heads stacked as rows of one block), then causally to the chunk; merged by LSE."""
    hq, t, d = q.shape[1], q.shape[2], q.shape[3]
    hkv = k.shape[1]
    g = hq // hkv
    if q.device.type != "cpu":
        own = (p_heads[None, :] == torch.arange(hkv, device=q.device)[:, None])[:, None, :].expand(hkv, t, -1)
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril().expand(hkv, t, t)
        mask = torch.cat([own, causal], -1).repeat_interleave(g, 0)[None]
        keys = torch.cat([pk.expand(hkv, -1, -1), k[0]], 1)
        values = torch.cat([pv.expand(hkv, -1, -1), v[0]], 1)
        return F.scaled_dot_product_attention(
            q, keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=True
        )
    p_out = q.new_zeros(1, hq, t, d, dtype=torch.float32)
    p_lse = torch.full((1, hq, t), float("-inf"), dtype=torch.float32)
    rows = q.reshape(hkv, g * t, d)
    for h in range(hkv):
        sel = (p_heads == h).nonzero().view(-1)
        if len(sel) == 0:
            continue
        o, lse = flash_lse(rows[h][None, None], pk[sel][None, None], pv[sel][None, None], False, scale)
        p_out[0, h * g : (h + 1) * g] = o.view(g, t, d)
        p_lse[0, h * g : (h + 1) * g] = lse.view(g, t)
    return merge([flash_lse(q, k, v, True, scale), (p_out, p_lse)], q.dtype)
