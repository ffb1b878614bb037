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

Layer-adaptive slots (`LayerBudgetPolicy`) keep a different count per global layer: `fill` is the
fullest layer's, and layer `l` holds `fill + layer_shift[l]` (shift <= 0, fixed once the prompt is
compressed; every later token lands at the same shift). A pool built with `layer_shift` gives each
global layer exactly that much less storage, so a one-context engine holds only what it keeps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from longserve.errors import InvalidParameterError
from longserve.kv.plan import DecodePlan, PrefillPlan
from longserve.kv.policies import Policy
from longserve.kv.policies.strategy import BY_SCORE
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
    layer_shift: tuple[int, ...] | None = None  # per layer: its fill minus `fill` (layer-adaptive slots)
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
        layer_shift: list[int] | tuple[int, ...] | None = None,
    ):
        """`layer_shift`: per layer, entries fewer than `capacity` a global layer stores (<= 0): the
        shifts of the layer-adaptive context this pool is built to hold."""
        if n_slots <= 0 or capacity <= 0:
            raise InvalidParameterError("a KV pool needs at least one slot of capacity >= 1")
        self.args, self.n_slots, self.capacity, self.dtype = args, n_slots, capacity, dtype
        self.device = device = torch.device(device)
        max_tokens = max_tokens or capacity
        shift = layer_shift or [0] * args.n_layers
        if len(shift) != args.n_layers or any(s > 0 or capacity + s < 1 for s in shift):
            raise InvalidParameterError(f"bad layer_shift {list(shift)} for capacity {capacity}")
        self.layer_shift = None if not any(shift) else tuple(shift)
        self.layer_capacity = [
            min(w, max_tokens) if w else capacity + s for w, s in zip(args.layer_windows, shift, strict=True)
        ]
        self.global_layers = [layer for layer, w in enumerate(args.layer_windows) if not w]
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
        if policy.decode.accumulates_scores:
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

    # ---- plans -------------------------------------------------------------------------------
    def plan_prefill(
        self,
        slot: int,
        positions: torch.Tensor,
        final: bool = True,
        staging: tuple[KVPool, int] | None = None,
        compress: bool = True,
        pass_scores: list[torch.Tensor | None] | None = None,
    ) -> PrefillPlan:
        """Plan `len(positions)` new tokens on top of what the slot (or its staging slot) holds
        (`pass_scores`: the policy's scoring-pass scores, which per-layer budgets may split by)."""
        state = self.slots[slot]
        src_pool, src_slot = staging or (self, slot)
        prefix_fill = src_pool.slots[src_slot].fill
        total = prefix_fill + len(positions)
        final_c = final and compress
        flat_prefix = staging is None and state.flat
        layer_keep = None
        if final_c and src_pool.slots[src_slot].layer_shift is not None and state.policy.kept(total) < total:
            raise InvalidParameterError(
                "a context compressed with per-layer budgets cannot be compressed again; "
                "continue it under 'full'"
            )
        if final_c and not flat_prefix:
            layer_keep = state.policy.layer_kept(total, self.global_layers, pass_scores)
        if layer_keep is not None:
            new_fill = max(layer_keep.values())
        else:
            new_fill = state.policy.kept(total) if final_c and not flat_prefix else total
        return PrefillPlan(
            slot,
            positions.to(self.device),
            final_c,
            src_pool,
            src_slot,
            state.written,
            prefix_fill,
            new_fill,
            final or staging is None,
            flat_prefix,
            final_c and not flat_prefix and state.policy.head_adaptive and new_fill < total,
            int(positions[-1]) + 1,
            layer_keep,
        )

    def plan_decode(self, slots: list[int]) -> DecodePlan:
        """Decide where each slot's next token goes (the next free entry, or what the policy's decode
        strategy picks in a full slot); mutates nothing but Quest's page bounds, which must cover the
        prompt before the first decode write."""
        from longserve.kv import quest_pages  # quest_pages reads the pool: import here, not at the top

        states, idx, positions = [], [], []
        evict_rows, evict_window, evict_limit = [], [], []
        for row, slot in enumerate(slots):
            old = self.slots[slot]
            if old.policy.sparse_decode:
                quest_pages.ensure(self, slot)
            state = dataclasses.replace(old, stats=dict(old.stats))
            policy = state.policy
            entry = state.fill if state.fill < state.limit else policy.decode.full_slot_entry(state)
            if entry is None:
                raise RuntimeError(f"slot {slot} is full ({state.limit}) under policy '{policy.name}'")
            if state.fill < state.limit:
                state.fill += 1
            elif entry == BY_SCORE:  # chosen per layer and head from the accumulated scores
                evict_rows.append(row)
                evict_window.append(policy.window)
                evict_limit.append(state.limit)
            idx.append(entry)
            positions.append(state.next_pos)
            state.written += 1
            state.next_pos += 1
            state.peak_fill = max(state.peak_fill, state.fill)
            states.append(state)
        dev = self.device

        def t(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        b = len(slots)
        held = [self.entry_nbytes * self._held_tokens(slot, s) for slot, s in zip(slots, states, strict=True)]
        return DecodePlan(
            slots=slots,
            slot_index=t(slots),
            contiguous=slots == list(range(b)),
            positions=t(positions),
            global_idx=t(idx),
            global_valid=t([s.fill for s in states]),
            sliding_written=t([s.written - 1 for s in states]),
            evict_rows=t(evict_rows) if evict_rows else None,
            evict_window=t(evict_window) if evict_rows else None,
            evict_limit=t(evict_limit) if evict_rows else None,
            track_scores=self.scores is not None and any(s.policy.decode.accumulates_scores for s in states),
            sparse_rows=[r for r, s in enumerate(states) if s.policy.sparse_decode],
            flat_rows=[r for r, s in enumerate(states) if s.flat],
            index_rows=idx,
            global_rows=[s.fill for s in states],
            sliding_rows=[s.written - 1 for s in states],
            states=states,
            bytes_read=held,
            layer_shift=self._shift_rows(states),
        )

    def _shift_rows(self, states: list[SlotState]) -> tuple[torch.Tensor, list[tuple[int, ...]]] | None:
        """Per row, each layer's entry shift ([B, layers] tensor + host rows); None: no row has any."""
        if all(s.layer_shift is None for s in states):
            return None
        zero = (0,) * self.args.n_layers
        rows = [s.layer_shift or zero for s in states]
        return torch.tensor(rows, dtype=torch.long, device=self.device), rows

    def write_index(self, plan: DecodePlan, layer: int) -> torch.Tensor:
        """[B, Hkv] entry each row's new token goes to in one layer (evicting rows: the lowest-scored
        entry outside the recent window, per head)."""
        b, h = len(plan.slots), self.args.n_kv_heads
        if self.args.layer_windows[layer]:
            return (plan.sliding_written % self.layer_capacity[layer])[:, None].expand(b, h)
        index = plan.global_idx[:, None].expand(b, h).clone()
        if plan.layer_shift is not None:
            index += plan.layer_shift[0][:, layer, None]
        if plan.evict_rows is not None:
            rows = plan.evict_rows
            slots = plan.slot_index[rows]
            scores = self.scores[layer][slots].clone()  # [R, Hkv, C]
            recent = self.pos[layer][slots] > (plan.positions[rows] - plan.evict_window)[:, None, None]
            entries = torch.arange(scores.shape[-1], device=self.device)
            unused = entries[None, None, :] >= plan.evict_limit[:, None, None]
            scores[recent | unused] = float("inf")
            index[rows] = scores.argmin(-1)
        return index

    def commit(self, plan: PrefillPlan | DecodePlan) -> None:
        """Apply a step's book-keeping once its writes are planned (decode) or done (prefill)."""
        if isinstance(plan, DecodePlan):
            for slot, state, nbytes in zip(plan.slots, plan.states, plan.bytes_read, strict=True):
                target = self.slots[slot]  # updated in place: callers may hold the SlotState
                for f in dataclasses.fields(SlotState):
                    setattr(target, f.name, getattr(state, f.name))
                target.bytes_read += nbytes
            return
        state = self.slots[plan.slot]
        state.written = plan.prefix_written + len(plan.positions)
        state.next_pos = plan.next_pos
        if not plan.into_slot:
            plan.src_pool.slots[plan.src_slot].fill = plan.new_fill
            return
        state.fill = plan.new_fill
        state.flat = state.flat or plan.made_flat
        if plan.layer_keep is not None:
            shift = [
                plan.layer_keep.get(layer, plan.new_fill) - plan.new_fill for layer in range(len(self.k))
            ]
            state.layer_shift = tuple(shift) if any(shift) else None
        state.protected = state.policy.protected_prefix(state.fill)
        state.ring_next = 0
        if (
            state.policy.decode.fixed_size
        ):  # a fixed-size policy never outgrows its budget (its fullest layer's)
            state.limit = min(self.capacity, max(state.policy.budget or 0, state.fill))
        state.peak_fill = max(state.peak_fill, state.fill)

    def commit_loaded(
        self,
        slot: int,
        fill: int,
        written: int,
        next_pos: int,
        flat: bool,
        layer_shift: tuple[int, ...] | None = None,
    ) -> None:
        """Book-keeping of a slot whose entries were copied in (a stored compressed context): the loaded
        prefix is protected from the ring, like a compressed prompt's selection."""
        state = self.slots[slot]
        state.flat, state.fill, state.written, state.next_pos = flat, fill, written, next_pos
        state.layer_shift = layer_shift
        state.protected = state.peak_fill = fill

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

    def layer_len(self, layer: int, slot: int, state: SlotState | None = None) -> int:
        """Valid entries of a slot in one layer: a sliding layer's ring, else the shared fill."""
        state = state or self.slots[slot]
        if self.args.layer_windows[layer]:
            return min(state.written, self.layer_capacity[layer])
        return state.fill + (state.layer_shift[layer] if state.layer_shift is not None else 0)

    def _held_tokens(self, slot: int, state: SlotState) -> int:
        return sum(self.layer_len(layer, slot, state) for layer in range(self.args.n_layers))

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
        self, layer: int, slot: int, fill: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The valid entries of a flat slot in one layer: `tokens * kv_heads` of them (`fill`: the
        layer's token count after a planned step; default: what it holds now)."""
        n = (self.layer_len(layer, slot) if fill is None else fill) * self.args.n_kv_heads
        return tuple(t[:n] for t in self.flat_view(layer, slot))
