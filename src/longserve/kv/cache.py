"""The KV cache the engine owns: a pool of sequence slots with physically compact K/V tensors.

Layout per layer: K and V are `[slots, kv_heads, capacity, head_dim]` and every entry records the
original position of its token (`pos`, -1 when empty). Keys are stored *after* RoPE, so evicting a
token never changes the phase of the tokens that stay; new tokens are rotated at their original
position (`SlotState.next_pos`), not at the cache length. A slot's capacity is fixed when the pool is
built (the policy's budget for fixed-size policies), which gives every sequence a static shape: the
bytes a compressed sequence holds are `capacity * bytes_per_token`, measured, not masked.

Sliding-window layers (Gemma3, Mistral) are never compressed: they keep a ring of their window.

Head-adaptive slots (AdaKV) keep a different number of tokens per KV head. Their global layers use
the same bytes, read as one flat list of `capacity * kv_heads` entries, each tagged with its head
(`heads`); attention masks by that tag. `fill` still counts tokens: `fill * kv_heads` entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longserve.errors import InvalidParameterError
from longserve.kv.policies import Policy
from longserve.model.config import ModelArgs


@dataclass
class SlotState:
    """Book-keeping of one sequence's cache, shared by all global-attention layers."""

    policy: Policy
    fill: int = 0  # entries in use in global layers (all heads, all layers hold the same count)
    protected: int = 0  # leading entries a ring never overwrites (sinks + selected middle)
    ring_next: int = 0  # next ring victim, relative to `protected`
    written: int = 0  # tokens ever written (drives the sliding-layer ring)
    next_pos: int = 0  # original position of the next token
    limit: int = 0  # most entries this sequence may hold in global layers (its budget, capped by the slot)
    peak_fill: int = 0
    bytes_read: int = 0  # K/V bytes read by attention during decode (Quest saves these)
    flat: bool = False  # global layers hold a head-adaptive flat layout (see the module docstring)
    stats: dict = field(default_factory=dict)


class KVPool:
    def __init__(
        self,
        args: ModelArgs,
        n_slots: int,
        capacity: int,
        max_tokens: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if n_slots <= 0 or capacity <= 0:
            raise InvalidParameterError("a KV pool needs at least one slot of capacity >= 1")
        self.args, self.n_slots, self.capacity, self.dtype = args, n_slots, capacity, dtype
        self.device = device = torch.device(device)
        max_tokens = max_tokens or capacity
        self.layer_capacity = [min(w, max_tokens) if w else capacity for w in args.layer_windows]
        shape = (n_slots, args.n_kv_heads)
        # zeros, not empty: masked-out entries still meet V in `probs @ V`, and 0 * NaN garbage is NaN
        self.k = [
            torch.zeros(*shape, c, args.head_dim, dtype=dtype, device=device) for c in self.layer_capacity
        ]
        self.v = [
            torch.zeros(*shape, c, args.head_dim, dtype=dtype, device=device) for c in self.layer_capacity
        ]
        self.pos = [torch.full((*shape, c), -1, dtype=torch.long, device=device) for c in self.layer_capacity]
        self.scores: list[torch.Tensor] | None = None  # H2O's accumulated attention, made on demand
        self.heads: list[torch.Tensor] | None = None  # KV head of each entry of flat slots, made on demand
        # Quest's key bounds per (layer, page size), made on demand
        self.page_bounds: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.entry_nbytes = 2 * args.n_kv_heads * args.head_dim * self.k[0].element_size()  # one token, K+V
        self.slots: list[SlotState | None] = [None] * n_slots
        self.free_slots = list(range(n_slots - 1, -1, -1))

    # ---- slots -------------------------------------------------------------------------------
    def allocate(self, policy: Policy) -> int:
        if not self.free_slots:
            raise RuntimeError("KV pool exhausted: the scheduler admitted more sequences than slots")
        slot = self.free_slots.pop()
        self.slots[slot] = SlotState(policy, limit=self.capacity)
        for pos in self.pos:
            pos[slot].fill_(-1)
        if policy.decode == "evict":
            self.ensure_scores()
            for s in self.scores:
                s[slot].zero_()
        return slot

    def free(self, slot: int) -> None:
        if self.slots[slot] is None:
            return
        self.slots[slot] = None
        self.free_slots.append(slot)
        self.free_slots.sort(reverse=True)  # lowest slot first keeps a batch contiguous

    def ensure_scores(self) -> None:
        if self.scores is None:
            self.scores = [torch.zeros(p.shape, dtype=torch.float32, device=self.device) for p in self.pos]

    def ensure_heads(self) -> None:
        if self.heads is None:
            self.heads = [torch.zeros(p.shape, dtype=torch.long, device=self.device) for p in self.pos]

    @property
    def n_free(self) -> int:
        return len(self.free_slots)

    # ---- sizes -------------------------------------------------------------------------------
    def slot_nbytes(self) -> int:
        """Bytes of K/V one slot physically occupies across all layers."""
        return self.entry_nbytes * sum(self.layer_capacity)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)

    def layer_len(self, layer: int, slot: int) -> int:
        """Valid entries of a slot in one layer: a sliding layer's ring, else the shared fill."""
        state = self.slots[slot]
        return (
            min(state.written, self.layer_capacity[layer]) if self.args.layer_windows[layer] else state.fill
        )

    def tokens_per_layer(self, slot: int) -> list[int]:
        return [self.layer_len(layer, slot) for layer in range(self.args.n_layers)]

    def tokens_per_head(self, slot: int) -> list[list[int]] | None:
        """Head-adaptive slots: tokens each KV head holds in each global layer (None otherwise)."""
        if not self.slots[slot].flat:
            return None
        n_heads = self.args.n_kv_heads
        return [
            torch.bincount(self.flat_entries(layer, slot)[3], minlength=n_heads).tolist()
            for layer in range(self.args.n_layers)
            if not self.args.layer_windows[layer]
        ]

    def held_nbytes(self, slot: int) -> int:
        """Bytes of K/V actually in use by a slot's tokens."""
        return self.entry_nbytes * sum(self.tokens_per_layer(slot))

    # ---- views -------------------------------------------------------------------------------
    def layer_entries(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, V, pos) of the valid entries of one slot in one layer: [Hkv, n, D], [Hkv, n, D], [Hkv, n]."""
        if self.is_flat(layer, slot):
            raise RuntimeError("a head-adaptive slot has no per-head layout; read it with flat_entries()")
        n = self.layer_len(layer, slot)
        return self.k[layer][slot, :, :n], self.v[layer][slot, :, :n], self.pos[layer][slot, :, :n]

    def is_flat(self, layer: int, slot: int) -> bool:
        return self.slots[slot].flat and not self.args.layer_windows[layer]

    def flat_view(
        self, layer: int, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K [C*Hkv, D], V, pos [C*Hkv], heads [C*Hkv]): a slot's global-layer storage as one entry list."""
        d = self.args.head_dim
        self.ensure_heads()
        return (
            self.k[layer][slot].view(-1, d),
            self.v[layer][slot].view(-1, d),
            self.pos[layer][slot].view(-1),
            self.heads[layer][slot].view(-1),
        )

    def flat_entries(
        self, layer: int, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The valid entries of a flat slot: `fill * kv_heads` of them."""
        n = self.slots[slot].fill * self.args.n_kv_heads
        return tuple(t[:n] for t in self.flat_view(layer, slot))
