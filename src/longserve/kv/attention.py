"""Attention backends: where the model's attention meets the KV pool and the policy.

`PrefillBackend` runs one sequence's prompt (or a further chunk of it) and, on the final chunk, lets
the policy choose which tokens the slot keeps. `DecodeBackend` runs one new token for a batch of
sequences. Neither decides anything about the cache: `KVPool` plans each step (where every new token
goes: append, ring or evict; valid lengths; positions) and commits the slots' book-keeping; the
backends write the planned entries and attend over the slots in place, without copying the cache when
the batch's slots are contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longserve.kv import attention_kernels as kernels
from longserve.kv import quest_pages
from longserve.kv.cache import KVPool
from longserve.kv.plan import DecodePlan
from longserve.kv.policies import ScoreInputs


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [H, L, D] or [H, L], index [H, n] -> entries of each head."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class PrefillBackend:
    """One sequence, `T` new tokens at `positions`, on top of whatever its slot already holds.

    The pool plans the chunk (`KVPool.plan_prefill`) and commits it (`finish`); this class only writes
    the planned entries and attends."""

    def __init__(
        self,
        pool: KVPool,
        slot: int,
        positions: torch.Tensor,
        final: bool = True,
        seed: int = 0,
        staging: tuple[KVPool, int] | None = None,
        compress: bool = True,
        pass_scores: list[torch.Tensor | None] | None = None,
        inv_freq: list[torch.Tensor] | None = None,
    ):
        """`staging`: where earlier chunks of a long prompt wait, uncompressed, until the final chunk
        lets the policy pick what the real slot keeps (chunked prefill of a compressed sequence).
        `compress=False` appends without running the policy (e.g. speculative verification).
        `pass_scores`: per layer, the policy's scoring-pass scores of every prompt entry (KVzip);
        `inv_freq`: per layer, RoPE inverse frequencies for scorers that rotate (expected attention)."""
        self.pool, self.slot, self.seed, self.pass_scores = pool, slot, seed, pass_scores
        self.inv_freq = inv_freq
        self.plan = pool.plan_prefill(slot, positions, final, staging, compress, pass_scores)
        self.positions = self.plan.positions
        self.src_pool, self.src_slot = self.plan.src_pool, self.plan.src_slot

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool, args = self.pool, self.pool.args
        window = args.layer_windows[layer]
        if self.plan.flat_prefix and not window:
            return self._attend_flat(layer, q, k, v)
        if window:
            pk, pv, ppos = pool.layer_entries(layer, self.slot)
        else:
            pk, pv, ppos = self.src_pool.layer_entries(layer, self.src_slot)
        out = kernels.chunk_attention(q, k, v, pk, pv, self.positions, ppos, args.scaling, window)
        if window:
            self._write_ring(layer, k[0], v[0])
            return out
        new_pos = self.positions.expand(args.n_kv_heads, k.shape[2])
        if pk.shape[1] == 0:
            keys, values, key_pos = k[0], v[0], new_pos
        else:
            keys, values = torch.cat([pk, k[0]], 1), torch.cat([pv, v[0]], 1)
            key_pos = torch.cat([ppos, new_pos], 1)
        self.write_global(layer, q[0], keys, values, key_pos)
        return out

    def _attend_flat(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """New tokens on top of a head-adaptive prefix: each KV head's queries see the prefix entries
        tagged with that head, then the new tokens causally; the new tokens append, all heads per token."""
        pool, slot, args = self.pool, self.slot, self.pool.args
        policy = pool.slots[slot].policy
        hkv, t, d = k.shape[1], k.shape[2], k.shape[3]
        plan, dev = self.plan, q.device
        if plan.final and policy.kept(plan.new_fill) < plan.new_fill:
            raise RuntimeError("a head-adaptive cache cannot be compressed a second time")
        pk, pv, _, ph = pool.flat_entries(layer, slot)
        out = kernels.flat_chunk_attention(q, k, v, pk, pv, ph, args.scaling)
        # < 0 in the emptier layers of a layer-adaptive slot (per-layer budgets)
        shift = pool.layer_len(layer, slot) - plan.prefix_fill
        if plan.new_fill + shift > pool.layer_capacity[layer]:
            raise RuntimeError(f"slot capacity {pool.layer_capacity[layer]} < {plan.new_fill + shift} tokens")
        fk, fv, fpos, fheads = pool.flat_view(layer, slot)
        # token-major: all heads of a token together
        new = slice((plan.prefix_fill + shift) * hkv, (plan.new_fill + shift) * hkv)
        fk[new] = k[0].transpose(0, 1).reshape(-1, d)
        fv[new] = v[0].transpose(0, 1).reshape(-1, d)
        fpos[new] = self.positions.repeat_interleave(hkv)
        fheads[new] = torch.arange(hkv, device=dev).repeat(t)
        return out

    def _write_ring(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pool = self.pool
        cap = pool.layer_capacity[layer]
        m = min(k.shape[1], cap)
        steps = torch.arange(k.shape[1] - m, k.shape[1], device=k.device)
        index = (self.plan.prefix_written + steps) % cap
        pool.k[layer][self.slot, :, index] = k[:, -m:]
        pool.v[layer][self.slot, :, index] = v[:, -m:]
        pool.pos[layer][self.slot, :, index] = self.positions[-m:]

    def write_global(
        self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_pos: torch.Tensor
    ) -> None:
        """Write a global layer's entries from the prefix + chunk keys [Hkv, L, D]: on the final chunk
        the policy selects what the slot keeps. Public so one forward pass can fill several slots
        from the same keys (`bench/kv_accuracy.py`'s fan-out over policies)."""
        plan = self.plan
        policy = self.pool.slots[self.slot].policy
        pool, slot = (self.pool, self.slot) if plan.into_slot else (self.src_pool, self.src_slot)
        total = keys.shape[1]
        if not plan.final:
            n_keep = total
        elif plan.layer_keep is not None:
            n_keep = plan.layer_keep[layer]
        else:
            n_keep = policy.kept(total)
        needs_scores = policy.decode.accumulates_scores
        scores = None
        if n_keep < total or needs_scores:
            extra = self.pass_scores[layer] if self.pass_scores is not None else None
            freq = self.inv_freq[layer] if self.inv_freq is not None else None
            inputs = ScoreInputs(
                layer, q, keys, values, key_pos[0], pool.args.scaling, self.seed, extra, freq
            )
            if n_keep < total and policy.head_adaptive:
                self._write_adaptive(layer, policy.select_adaptive(inputs, n_keep), keys, values, key_pos)
                return
            if n_keep < total:
                keep = policy.select(inputs, n_keep)
                keys, values, key_pos = _gather(keys, keep), _gather(values, keep), _gather(key_pos, keep)
            if needs_scores:
                scores = policy.score(inputs).float().expand(keys.shape[0], total)
                scores = _gather(scores, keep) if n_keep < total else scores
        if n_keep > pool.layer_capacity[layer]:
            raise RuntimeError(f"slot capacity {pool.layer_capacity[layer]} < {n_keep} kept tokens")
        # appending in place: only the chunk's own tokens are new (the layer's prefix is already there)
        start = 0 if (n_keep < total or pool is not self.src_pool) else total - q.shape[1]
        new, src = slice(start, n_keep), slice(start, None)
        pool.k[layer][slot, :, new] = keys[:, src]
        pool.v[layer][slot, :, new] = values[:, src]
        pool.pos[layer][slot, :, new] = key_pos[:, src]
        if scores is not None:
            pool.ensure_scores()
            pool.scores[layer][slot, :, new] = scores[:, src]

    def _write_adaptive(self, layer, selected, keys, values, key_pos) -> None:
        """AdaKV: the layer's kept (head, token) pairs fill the slot as one flat entry list."""
        heads, tokens = selected
        n = len(heads)
        if n > self.pool.layer_capacity[layer] * self.pool.args.n_kv_heads:
            raise RuntimeError(f"slot capacity {self.pool.layer_capacity[layer]} too small for {n} entries")
        fk, fv, fpos, fheads = self.pool.flat_view(layer, self.slot)
        fk[:n], fv[:n], fpos[:n], fheads[:n] = (
            keys[heads, tokens],
            values[heads, tokens],
            key_pos[heads, tokens],
            heads,
        )

    def finish(self) -> None:
        """Once every layer has run: the pool commits the chunk's book-keeping."""
        self.pool.commit(self.plan)


class DecodeBackend:
    """One token for each of a batch of slots, written and read as `plan` (`KVPool.plan_decode`) says."""

    def __init__(self, pool: KVPool, plan: DecodePlan):
        self.pool, self.plan = pool, plan
        self.heads = torch.arange(pool.args.n_kv_heads, device=pool.device)
        self.flat_index = torch.tensor(plan.flat_rows, dtype=torch.long, device=pool.device)

    @property
    def positions(self) -> torch.Tensor:
        return self.plan.positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool, plan = self.pool, self.plan
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        index = pool.write_index(plan, layer)
        rows = plan.slot_index[:, None].expand(b, hkv)
        heads = self.heads[None, :].expand(b, hkv)
        is_global = not pool.args.layer_windows[layer]
        flat = plan.flat_rows and is_global
        if flat:  # head-adaptive slots: the token's entries go to flat indices, all heads together
            fr = self.flat_index
            entry = index[fr] * hkv + self.heads[None, :]
            cap = pool.layer_capacity[layer]
            heads, index = heads.clone(), index.clone()
            heads[fr], index[fr] = entry // cap, entry % cap
            pool.ensure_heads()
            pool.heads[layer][rows[fr], heads[fr], index[fr]] = self.heads[None, :].expand(len(fr), hkv)
        pool.k[layer][rows, heads, index] = k[:, :, 0]
        pool.v[layer][rows, heads, index] = v[:, :, 0]
        pool.pos[layer][rows, heads, index] = plan.positions[:, None].expand(b, hkv)
        if plan.track_scores:
            pool.scores[layer][rows, heads, index] = 0.0
        if plan.sparse_rows and is_global:
            quest_pages.update(
                pool,
                layer,
                [plan.slots[r] for r in plan.sparse_rows],
                [plan.index_rows[r] for r in plan.sparse_rows],
                k[plan.sparse_rows, :, 0],
            )

        valid, valid_rows = plan.valid(pool, layer)
        limit = max(valid_rows)  # host ints from the plan: no device sync per layer
        if plan.contiguous:
            keys, values = pool.k[layer][:b, :, :limit], pool.v[layer][:b, :, :limit]
        else:
            keys, values = (
                pool.k[layer][plan.slot_index, :, :limit],
                pool.v[layer][plan.slot_index, :, :limit],
            )
        mask = None
        if min(valid_rows) < limit:
            mask = (torch.arange(limit, device=q.device)[None, :] < valid[:, None])[:, None, None, :]
        qg = q.view(b, hkv, hq // hkv, d)  # each KV head's query group attends as a tiny query block
        if plan.track_scores:
            logits = (qg @ keys.transpose(-1, -2)) * pool.args.scaling
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            probs = logits.float().softmax(-1)
            out = probs.to(values.dtype) @ values
            pool.scores[layer][plan.slot_index, :, :limit] += probs.sum(2)
        else:
            out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=pool.args.scaling)
        if plan.sparse_rows and is_global:
            out = out.clone()
            for row in plan.sparse_rows:  # Quest: attend over the selected pages only
                out[row], saved = quest_pages.attend(pool, layer, plan.slots[row], qg[row], valid_rows[row])
                plan.bytes_read[row] += saved
        if flat:
            out = out.clone()
            for row in plan.flat_rows:
                out[row] = self._attend_flat(layer, plan.slots[row], qg[row], valid_rows[row])
        return out.view(b, hq, 1, d)

    def _attend_flat(self, layer: int, slot: int, qg: torch.Tensor, fill: int) -> torch.Tensor:
        """One head-adaptive slot: each KV head's query group [Hkv, G, D] over the entries of that head."""
        keys, values, _, heads = self.pool.flat_entries(layer, slot, fill)
        logits = (qg @ keys.T).float() * self.pool.args.scaling  # [Hkv, G, E]
        logits = logits.masked_fill(heads[None, None, :] != self.heads[:, None, None], float("-inf"))
        return logits.softmax(-1).to(values.dtype) @ values
