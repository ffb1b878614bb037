"""The step plans `KVPool` hands the attention backends: what one step writes where and reads how far.

The pool (with each slot's policy) decides; the backends only write the planned entries and attend;
the pool then commits the slots' book-keeping (nano-vllm's block manager / prepare_decode split)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from longserve.kv.cache import KVPool, SlotState


@dataclass
class PrefillPlan:
    """What one prefill chunk of one slot writes, decided by the pool before the forward pass.

    Everything is known up front: the chunk appends (or, on the final chunk of a compressing policy,
    the policy keeps `policy.kept(total)` tokens), so the attention backend only writes and reads."""

    slot: int
    positions: torch.Tensor  # [T] original positions of the chunk's tokens (pool device)
    final: bool  # the policy selects what the slot keeps (last chunk, compression on)
    src_pool: KVPool  # where the uncompressed prefix lives (the pool itself or a staging pool)
    src_slot: int
    prefix_written: int
    prefix_fill: int  # tokens of the prefix in `src_pool`
    new_fill: int  # global-layer tokens the slot (or the staging slot) holds after the chunk
    into_slot: bool  # global layers write the real slot (else the staging slot)
    flat_prefix: bool  # the chunk appends on top of a head-adaptive slot
    made_flat: bool  # the policy's selection makes the slot head-adaptive
    next_pos: int
    layer_keep: dict[int, int] | None = None  # per global layer: tokens kept (per-layer budgets)


@dataclass
class DecodePlan:
    """One decode step of a batch of slots: where each new token goes in each kind of layer, the valid
    lengths attention reads, and the slots' book-keeping after the step (committed by the pool).

    Tensors live on the pool's device; the Python ints (`valid_max`, `valid_rows`) are what the backend
    needs on the host, computed here from the book-keeping so attention never syncs with the device."""

    slots: list[int]
    slot_index: torch.Tensor  # [B]
    contiguous: bool  # slots 0..B-1: attention reads the pool in place
    positions: torch.Tensor  # [B] original position of each new token
    global_idx: torch.Tensor  # [B] entry of the new token in global layers (-1: evict, chosen per layer)
    global_valid: torch.Tensor  # [B] valid global entries after the write
    sliding_written: torch.Tensor  # [B] tokens written before this one (sliding-layer ring index)
    evict_rows: torch.Tensor | None  # rows whose entry is chosen from H2O scores, with their window/limit
    evict_window: torch.Tensor | None
    evict_limit: torch.Tensor | None
    track_scores: bool
    sparse_rows: list[int]  # rows under a sparse-decode policy (Quest)
    flat_rows: list[int]  # rows whose slot is head-adaptive
    index_rows: list[int]  # host copy of `global_idx`
    global_rows: list[int]  # valid global entries per row (host copy of `global_valid`)
    sliding_rows: list[int]  # tokens written before this one per row (host copy of `sliding_written`)
    states: list[SlotState]  # book-keeping of each slot after the step
    bytes_read: list[int]  # per row: K/V bytes attention reads this step (sparse attention adjusts it)
    # layer-adaptive rows: ([B, layers] entry shift of each layer, the same as host rows); None: none
    layer_shift: tuple[torch.Tensor, list[tuple[int, ...]]] | None = None

    def valid(self, pool: KVPool, layer: int) -> tuple[torch.Tensor, list[int]]:
        """Valid entries per row in one layer after the write: (device tensor [B], host list)."""
        cap = pool.layer_capacity[layer]
        if pool.args.layer_windows[layer]:
            return torch.clamp(self.sliding_written + 1, max=cap), [
                min(w + 1, cap) for w in self.sliding_rows
            ]
        if self.layer_shift is None:
            return self.global_valid, self.global_rows
        shift, rows = self.layer_shift
        return self.global_valid + shift[:, layer], [
            n + r[layer] for n, r in zip(self.global_rows, rows, strict=True)
        ]
