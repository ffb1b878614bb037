"""Quest's page metadata and sparse decode attention (used by `QuestPolicy`).

Per page of `page_size` cache entries and per KV head we keep the element-wise min and max of the
keys. `q . k <= sum_d max(q_d * min_d, q_d * max_d)` bounds the attention logit of any key in the
page, so the pages with the highest bounds are read and the rest are skipped: fewer bytes read per
step, the same bytes held.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longserve.kv.cache import KVPool


def page_tables(pool: KVPool, layer: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kmin, kmax) [slots, Hkv, pages, D] of one layer for slots with pages of `page_size` entries.

    Keyed by page size, since slots of one pool may run Quest with different page sizes."""
    key = (layer, page_size)
    if key not in pool.page_bounds:
        n_pages = math.ceil(pool.layer_capacity[layer] / page_size)
        shape = (pool.n_slots, pool.args.n_kv_heads, n_pages, pool.args.head_dim)
        pool.page_bounds[key] = (
            torch.full(shape, float("inf"), device=pool.device),
            torch.full(shape, float("-inf"), device=pool.device),
        )
    return pool.page_bounds[key]


def ensure(pool: KVPool, slot: int) -> None:
    """Build the bounds of a slot's pages once, right after its prefill."""
    state = pool.slots[slot]
    if state.stats.get("quest_pages"):
        return
    page = state.policy.page_size
    for layer, window in enumerate(pool.args.layer_windows):
        if window:
            continue
        kmin, kmax = page_tables(pool, layer, page)
        keys = pool.k[layer][slot, :, : state.fill].float()
        n_pages = math.ceil(state.fill / page)
        padded = F.pad(keys, (0, 0, 0, n_pages * page - state.fill), value=float("nan"))
        blocks = padded.view(keys.shape[0], n_pages, page, -1)
        kmin[slot, :, :n_pages] = blocks.nan_to_num(float("inf")).amin(2)
        kmax[slot, :, :n_pages] = blocks.nan_to_num(float("-inf")).amax(2)
    state.stats["quest_pages"] = True


def update(pool: KVPool, layer: int, slots: list[int], index: list[int], keys: torch.Tensor) -> None:
    """Fold newly written keys [R, Hkv, D] at entries `index` (host ints) into their pages' bounds."""
    for slot, i, k in zip(slots, index, keys, strict=True):
        size = pool.slots[slot].policy.page_size
        kmin, kmax = page_tables(pool, layer, size)
        page = i // size
        kmin[slot, :, page] = torch.minimum(kmin[slot, :, page], k.float())
        kmax[slot, :, page] = torch.maximum(kmax[slot, :, page], k.float())


def attend(pool: KVPool, layer: int, slot: int, q: torch.Tensor, n_valid: int) -> tuple[torch.Tensor, int]:
    """q [Hkv, G, D] -> ([Hkv, G, D], bytes read minus what dense attention reads), reading only the
    top pages of each KV head. The caller accounts the bytes (the slot's book-keeping is the pool's)."""
    policy = pool.slots[slot].policy
    page = policy.page_size
    n_pages = math.ceil(n_valid / page)
    kmin, kmax = (t[slot, :, :n_pages] for t in page_tables(pool, layer, page))
    qf = q.float()[:, :, None, :]  # [Hkv, G, 1, D]
    bound = torch.maximum(qf * kmin[:, None], qf * kmax[:, None]).sum(-1).amax(1)  # [Hkv, n_pages]
    bound[:, -1] = float("inf")  # the current page is always read
    n_read = min(n_pages, policy.pages_read())
    top = bound.topk(n_read, dim=-1).indices  # [Hkv, n_read]
    entries = (top[..., None] * page + torch.arange(page, device=q.device)).flatten(1)  # [Hkv, n_read * page]
    valid = entries < n_valid
    entries = entries.clamp(max=n_valid - 1)
    gather = entries[..., None].expand(-1, -1, q.shape[-1])
    keys = pool.k[layer][slot].gather(1, gather)
    values = pool.v[layer][slot].gather(1, gather)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=valid[:, None, :], scale=pool.args.scaling
    )
    entry = 2 * q.shape[-1] * keys.element_size()
    dense = n_valid * q.shape[0] * entry
    # valid entries read, known on the host: n_read - 1 full pages plus the (always read) current page
    n_entries = q.shape[0] * ((n_read - 1) * page + n_valid - (n_pages - 1) * page)
    return out, n_entries * entry + 2 * n_pages * q.shape[0] * q.shape[-1] * 4 - dense
