"""A KV slot that can run tokens speculatively and later keep only a prefix of them.

Speculative decoding writes tokens into the cache that may be rejected. `SpeculativeSlot` records, for
every speculative token, exactly what its writes overwrote (an undo journal) plus the slot's
book-keeping after it, so `commit(m)` restores the cache to what a plain run that decoded only the
first `m` tokens would hold. How each policy is handled:

- append-only policies (full, snapkv, knorm, random) and ring policies (streaming, sage, snapstream)
  while their slot still has free room: a block of tokens runs in ONE `PrefillBackend(compress=False)`
  forward; rollback = truncation of the global layers, plus restoring the few ring entries of
  sliding-window layers (Gemma3, Mistral) the block overwrote. A single token (a draft step) runs as a
  plain in-place decode step instead.
- ring policies once full, evict policies (h2o) and sparse-decode policies (quest: append-only, but its
  decode reads selected pages and keeps per-page key bounds): the block still runs as ONE model forward,
  but attention goes token by token through `DecodeBackend`s inside each layer, so ring victims, H2O's
  score-driven evictions and score accumulation, and Quest's page bounds evolve exactly as in plain
  decoding. Rollback restores the overwritten entries (and H2O scores / Quest page bounds) from the
  journal, newest first.

Either way the valid cache entries, positions, fill and ring/eviction state after `commit(m)` are those
of a non-speculative run. With `exact` (the default for bf16 models, whose one-token steps are
row-invariant: `CausalLM.row_invariant`) every block takes the stepped path, so K/V and logits are also
bit-identical to plain decoding; the stepped attention costs a few percent more than the one-shot block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from longserve.kv import quest_pages
from longserve.kv.attention import DecodeBackend, PrefillBackend
from longserve.kv.cache import KVPool, SlotState
from longserve.kv.plan import DecodePlan
from longserve.model import CausalLM


@dataclass
class _Undo:
    """What one token's write in one layer overwrote."""

    layer: int
    index: torch.Tensor  # [Hkv] entry per head
    k: torch.Tensor  # [Hkv, D]
    v: torch.Tensor
    pos: torch.Tensor  # [Hkv]
    scores: torch.Tensor | None = None  # the slot's whole H2O score row [Hkv, C] before this token
    page: int | None = None  # Quest page touched, with its bounds before this token
    kmin: torch.Tensor | None = None
    kmax: torch.Tensor | None = None


def snapshot(state: SlotState) -> SlotState:
    return dataclasses.replace(state, stats=dict(state.stats))


def _restore_state(target: SlotState, snap: SlotState) -> None:
    for f in dataclasses.fields(SlotState):
        value = getattr(snap, f.name)
        setattr(target, f.name, dict(value) if f.name == "stats" else value)


class _SteppedBackend:
    """Attention of a block of tokens run one token at a time inside each layer (decode semantics)."""

    def __init__(self, slot: SpeculativeSlot, backends: list[DecodeBackend], journal: list[list[_Undo]]):
        self.slot, self.backends, self.journal = slot, backends, journal

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, backend in enumerate(self.backends):
            index = self.slot.pool.write_index(backend.plan, layer)[0]
            self.journal[i].append(self.slot.undo_entry(layer, index, backend.plan))
            outs.append(backend.attend(layer, q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1]))
        return torch.cat(outs, dim=2)


class SpeculativeSlot:
    """One sequence's slot in a pool, driven token block by token block with rollback.

    Call `forward(ids)` any number of times (each returns logits for every token), then `commit(m)` to
    keep the first `m` tokens run since the last commit and undo the rest.
    """

    def __init__(self, model: CausalLM, pool: KVPool, slot: int, exact: bool | None = None):
        """`exact` (default: the model's `row_invariant`): every block runs the stepped path, whose
        attention is a plain decode step's per token; with row-invariant linears a verified token's
        logits are then the same bits as in target-only decoding, so greedy output is identical."""
        self.model, self.pool, self.slot = model, pool, slot
        self.exact = model.row_invariant if exact is None else exact
        self.journal: list[list[_Undo]] = []  # per uncommitted token
        self.states: list[SlotState] = []  # slot book-keeping after each uncommitted token
        self.base: SlotState | None = None  # book-keeping before the first uncommitted token
        self.heads = torch.arange(pool.args.n_kv_heads, device=pool.device)
        self.block_forwards = self.stepped_forwards = 0

    @property
    def state(self) -> SlotState:
        return self.pool.slots[self.slot]

    @property
    def pending(self) -> int:
        return len(self.journal)

    def can_block(self, n: int) -> bool:
        """Whether `n` tokens can go through the one-shot PrefillBackend path."""
        state, pool = self.state, self.pool
        policy = state.policy
        if policy.decode.accumulates_scores or policy.sparse_decode:
            return False
        if state.fill + n > pool.capacity:  # a ring slot about to wrap, or no room left
            return False
        windows = [c for w, c in zip(pool.args.layer_windows, pool.layer_capacity, strict=True) if w]
        return all(n <= c for c in windows)

    @torch.inference_mode()
    def forward(self, ids: list[int]) -> torch.Tensor:
        """Run `ids` on top of the slot; returns logits [len(ids), V]."""
        if not ids:
            raise ValueError("forward needs at least one token")
        if self.base is None:
            self.base = snapshot(self.state)
        if len(ids) > 1 and not self.exact and self.can_block(len(ids)):  # one token: plain decode
            return self._block(ids)
        return self._stepped(ids)

    def undo_entry(self, layer: int, index: torch.Tensor, plan: DecodePlan | None) -> _Undo:
        """What writing entries `index` [Hkv] of one layer will overwrite (under a decode `plan`, also
        the H2O scores and Quest page bounds it touches)."""
        pool, s = self.pool, self.slot
        undo = _Undo(
            layer,
            index,
            pool.k[layer][s, self.heads, index].clone(),
            pool.v[layer][s, self.heads, index].clone(),
            pool.pos[layer][s, self.heads, index].clone(),
        )
        if plan is not None and plan.track_scores:
            undo.scores = pool.scores[layer][s].clone()
        if plan is not None and plan.sparse_rows and not pool.args.layer_windows[layer]:
            size = self.state.policy.page_size
            kmin, kmax = quest_pages.page_tables(pool, layer, size)
            undo.page = plan.index_rows[0] // size
            undo.kmin, undo.kmax = kmin[s, :, undo.page].clone(), kmax[s, :, undo.page].clone()
        return undo

    def _block(self, ids: list[int]) -> torch.Tensor:
        pool, state, t = self.pool, self.state, len(ids)
        before = snapshot(state)
        journal: list[list[_Undo]] = [[] for _ in range(t)]
        for layer, window in enumerate(pool.args.layer_windows):
            for i in range(t):
                entry = (state.written + i) % pool.layer_capacity[layer] if window else state.fill + i
                index = torch.full((len(self.heads),), entry, device=pool.device)
                journal[i].append(self.undo_entry(layer, index, None))
        positions = torch.arange(state.next_pos, state.next_pos + t, device=pool.device)
        backend = PrefillBackend(pool, self.slot, positions, compress=False)
        ids_t = torch.tensor([ids], device=pool.device)
        logits = self.model(ids_t, positions[None], backend, last_only=False)[0]
        backend.finish()
        # the book-keeping after each token is what plain decode steps would have left
        _restore_state(state, before)
        for _ in range(t):
            pool.commit(pool.plan_decode([self.slot]))
            self.states.append(snapshot(self.state))
        self.journal.extend(journal)
        self.block_forwards += 1
        return logits

    def _stepped(self, ids: list[int]) -> torch.Tensor:
        backends = []
        for _ in ids:  # each token's plan is committed before the next is planned: the slot advances
            plan = self.pool.plan_decode([self.slot])
            self.pool.commit(plan)
            backends.append(DecodeBackend(self.pool, plan))
            self.states.append(snapshot(self.state))
        journal: list[list[_Undo]] = [[] for _ in ids]
        positions = torch.cat([b.positions for b in backends])
        ids_t = torch.tensor([ids], device=self.pool.device)
        logits = self.model(
            ids_t, positions[None], _SteppedBackend(self, backends, journal), last_only=False
        )[0]
        self.journal.extend(journal)
        self.stepped_forwards += 1
        return logits

    @torch.inference_mode()
    def commit(self, keep: int) -> None:
        """Keep the first `keep` tokens run since the last commit; undo the others, newest first."""
        if not 0 <= keep <= self.pending:
            raise ValueError(f"cannot keep {keep} of {self.pending} speculative tokens")
        if self.base is None:
            return
        pool, s = self.pool, self.slot
        for token in reversed(self.journal[keep:]):
            for u in reversed(token):
                pool.k[u.layer][s, self.heads, u.index] = u.k
                pool.v[u.layer][s, self.heads, u.index] = u.v
                pool.pos[u.layer][s, self.heads, u.index] = u.pos
                if u.scores is not None:
                    pool.scores[u.layer][s] = u.scores
                if u.page is not None:
                    kmin, kmax = quest_pages.page_tables(pool, u.layer, self.state.policy.page_size)
                    kmin[s, :, u.page], kmax[s, :, u.page] = u.kmin, u.kmax
        _restore_state(self.state, self.states[keep - 1] if keep else self.base)
        self.journal, self.states, self.base = [], [], None
