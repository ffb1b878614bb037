"""Attention backends: where the model's attention meets the KV pool and the policy.

`PrefillBackend` runs one sequence's prompt (or a further chunk of it) and, on the final chunk, lets
the policy choose which tokens the slot keeps. `DecodeBackend` runs one new token for a batch of
sequences: it writes each token where its policy says (append, ring or evict), then attends over
the slots in place, without copying the cache when the batch's slots are contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longserve.kv import quest_pages
from longserve.kv.cache import KVPool
from longserve.kv.policies import ScoreInputs


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [H, L, D] or [H, L], index [H, n] -> entries of each head."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class PrefillBackend:
    """One sequence, `T` new tokens at `positions`, on top of whatever its slot already holds."""

    def __init__(
        self,
        pool: KVPool,
        slot: int,
        positions: torch.Tensor,
        final: bool = True,
        seed: int = 0,
        staging: tuple[KVPool, int] | None = None,
        compress: bool = True,
    ):
        """`staging`: where earlier chunks of a long prompt wait, uncompressed, until the final chunk
        lets the policy pick what the real slot keeps (chunked prefill of a compressed sequence).
        `compress=False` appends without running the policy (e.g. speculative verification)."""
        self.pool, self.slot, self.positions, self.seed = pool, slot, positions, seed
        self.final = final and compress
        self.src_pool, self.src_slot = staging or (pool, slot)
        state = pool.slots[slot]
        self.prefix_written = state.written
        self.prefix_fill = self.src_pool.slots[self.src_slot].fill
        self.new_fill = self.prefix_fill + len(positions)
        self.into_slot = final or staging is None  # global layers write the real slot (else the staging)
        self.flat_prefix = staging is None and state.flat  # a head-adaptive slot gets more tokens
        self.made_flat = False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool, args = self.pool, self.pool.args
        window = args.layer_windows[layer]
        if self.flat_prefix and not window:
            return self._attend_flat(layer, q, k, v)
        if window:
            pk, pv, ppos = pool.layer_entries(layer, self.slot)
        else:
            pk, pv, ppos = self.src_pool.layer_entries(layer, self.src_slot)
        t = k.shape[2]
        if pk.shape[1] == 0 and window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=args.scaling, enable_gqa=True)
            keys, values = k[0], v[0]
            key_pos = self.positions.expand(args.n_kv_heads, t)
        else:
            keys, values = torch.cat([pk, k[0]], 1), torch.cat([pv, v[0]], 1)
            key_pos = torch.cat([ppos, self.positions.expand(args.n_kv_heads, t)], 1)
            qp, kp = self.positions[:, None], key_pos[0][None, :]  # prefix tokens all precede new ones
            mask = kp <= qp
            if window:
                mask &= (qp - kp) < window
            out = F.scaled_dot_product_attention(
                q, keys[None], values[None], attn_mask=mask, scale=args.scaling, enable_gqa=True
            )
        if window:
            self._write_ring(layer, k[0], v[0])
        else:
            self._write_global(layer, q[0], keys, values, key_pos)
        return out

    def _attend_flat(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """New tokens on top of a head-adaptive prefix: each KV head's queries see the prefix entries
        tagged with that head, then the new tokens causally; the new tokens append, all heads per token."""
        pool, slot, args = self.pool, self.slot, self.pool.args
        policy = pool.slots[slot].policy
        hkv, t, d = k.shape[1], k.shape[2], k.shape[3]
        if self.final and policy.kept(self.new_fill) < self.new_fill:
            raise RuntimeError("a head-adaptive cache cannot be compressed a second time")
        pk, pv, _, ph = pool.flat_entries(layer, slot)
        keys = torch.cat([pk.expand(hkv, -1, -1), k[0]], 1)
        values = torch.cat([pv.expand(hkv, -1, -1), v[0]], 1)
        own = (ph[None, :] == torch.arange(hkv)[:, None])[:, None, :].expand(hkv, t, -1)
        causal = torch.ones(t, t, dtype=torch.bool).tril().expand(hkv, t, t)
        mask = torch.cat([own, causal], -1).repeat_interleave(q.shape[1] // hkv, 0)[None]
        out = F.scaled_dot_product_attention(
            q, keys[None], values[None], attn_mask=mask, scale=args.scaling, enable_gqa=True
        )
        if self.new_fill > pool.layer_capacity[layer]:
            raise RuntimeError(f"slot capacity {pool.layer_capacity[layer]} < {self.new_fill} tokens")
        fk, fv, fpos, fheads = pool.flat_view(layer, slot)
        new = slice(self.prefix_fill * hkv, self.new_fill * hkv)  # token-major: all heads of a token together
        fk[new] = k[0].transpose(0, 1).reshape(-1, d)
        fv[new] = v[0].transpose(0, 1).reshape(-1, d)
        fpos[new] = self.positions.repeat_interleave(hkv)
        fheads[new] = torch.arange(hkv).repeat(t)
        return out

    def _write_ring(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pool = self.pool
        cap = pool.layer_capacity[layer]
        m = min(k.shape[1], cap)
        index = (self.prefix_written + torch.arange(k.shape[1] - m, k.shape[1])) % cap
        pool.k[layer][self.slot, :, index] = k[:, -m:]
        pool.v[layer][self.slot, :, index] = v[:, -m:]
        pool.pos[layer][self.slot, :, index] = self.positions[-m:]

    def _write_global(self, layer, q, keys, values, key_pos) -> None:
        policy = self.pool.slots[self.slot].policy
        pool, slot = (self.pool, self.slot) if self.into_slot else (self.src_pool, self.src_slot)
        total = keys.shape[1]
        n_keep = policy.kept(total) if self.final else total
        needs_scores = policy.decode == "evict"
        scores = None
        if n_keep < total or needs_scores:
            inputs = ScoreInputs(layer, q, keys, values, key_pos[0], pool.args.scaling, self.seed)
            if n_keep < total and policy.head_adaptive:
                self._write_adaptive(layer, policy.select_adaptive(inputs, n_keep), keys, values, key_pos)
                self.new_fill = n_keep
                return
            if n_keep < total:
                keep = policy.select(inputs, n_keep)
                keys, values, key_pos = _gather(keys, keep), _gather(values, keep), _gather(key_pos, keep)
            if needs_scores:
                scores = policy.score(inputs).float().expand(keys.shape[0], total)
                scores = _gather(scores, keep) if n_keep < total else scores
        if n_keep > pool.capacity:
            raise RuntimeError(f"slot capacity {pool.capacity} < {n_keep} kept tokens")
        start = 0 if (n_keep < total or pool is not self.src_pool) else self.prefix_fill
        new, src = slice(start, n_keep), slice(start, None)
        pool.k[layer][slot, :, new] = keys[:, src]
        pool.v[layer][slot, :, new] = values[:, src]
        pool.pos[layer][slot, :, new] = key_pos[:, src]
        if scores is not None:
            pool.ensure_scores()
            pool.scores[layer][slot, :, new] = scores[:, src]
        self.new_fill = n_keep

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
        self.made_flat = True

    def finish(self) -> None:
        """Commit the book-keeping once every layer has run."""
        state = self.pool.slots[self.slot]
        t = len(self.positions)
        state.written = self.prefix_written + t
        state.next_pos = int(self.positions[-1]) + 1
        if not self.into_slot:
            self.src_pool.slots[self.src_slot].fill = self.new_fill
            return
        state.fill = self.new_fill
        state.flat = state.flat or self.made_flat
        state.protected = state.policy.protected_prefix(state.fill)
        state.ring_next = 0
        if state.policy.decode != "append":  # a fixed-size policy never outgrows its budget
            state.limit = min(self.pool.capacity, state.policy.budget or state.fill)
        state.peak_fill = max(state.peak_fill, state.fill)


class DecodeBackend:
    """One token for each of a batch of slots."""

    def __init__(self, pool: KVPool, slots: list[int]):
        self.pool, self.slots = pool, slots
        b = len(slots)
        for slot in slots:  # Quest's page bounds cover the prompt before any decode write
            if getattr(pool.slots[slot].policy, "sparse_decode", False):
                quest_pages.ensure(pool, slot)
        self.slot_index = torch.tensor(slots)
        self.contiguous = slots == list(range(b))
        global_idx, sliding_idx, global_valid, positions = [], [], [], []
        self.evict_rows = []
        for row, slot in enumerate(slots):
            state = pool.slots[slot]
            policy = state.policy
            if state.fill < state.limit:
                global_idx.append(state.fill)
                state.fill += 1
            elif policy.decode == "ring" and state.limit > state.protected:
                global_idx.append(state.protected + state.ring_next % (state.limit - state.protected))
                state.ring_next += 1
            elif policy.decode == "evict":
                global_idx.append(-1)  # chosen per layer and head from the accumulated scores
                self.evict_rows.append(row)
            else:
                raise RuntimeError(f"slot {slot} is full ({state.limit}) under policy '{policy.name}'")
            sliding_idx.append(state.written)
            global_valid.append(state.fill)
            positions.append(state.next_pos)
            state.written += 1
            state.next_pos += 1
            state.peak_fill = max(state.peak_fill, state.fill)
        self.positions = torch.tensor(positions)
        self.global_idx = torch.tensor(global_idx)
        self.global_valid = torch.tensor(global_valid)
        self.sliding_written = torch.tensor(sliding_idx)
        self.track_scores = pool.scores is not None and any(
            pool.slots[s].policy.decode == "evict" for s in slots
        )
        self.heads = torch.arange(pool.args.n_kv_heads)
        self.sparse_rows = [
            r for r, s in enumerate(slots) if getattr(pool.slots[s].policy, "sparse_decode", False)
        ]
        self.flat_rows = [r for r, s in enumerate(slots) if pool.slots[s].flat]
        for slot in slots:  # what dense attention reads this step, over all layers
            pool.slots[slot].bytes_read += pool.held_nbytes(slot)

    def _valid(self, layer: int) -> torch.Tensor:
        cap = self.pool.layer_capacity[layer]
        if self.pool.args.layer_windows[layer]:
            return torch.clamp(self.sliding_written + 1, max=cap)
        return self.global_valid

    def _write_index(self, layer: int) -> torch.Tensor:
        """[B, Hkv] cache entry each sequence's new token goes to in this layer."""
        pool = self.pool
        b, h = len(self.slots), pool.args.n_kv_heads
        if pool.args.layer_windows[layer]:
            return (self.sliding_written % pool.layer_capacity[layer])[:, None].expand(b, h)
        index = self.global_idx[:, None].expand(b, h).clone()
        if self.evict_rows:
            rows = torch.tensor(self.evict_rows)
            slots = self.slot_index[rows]
            window = torch.tensor([pool.slots[self.slots[r]].policy.window for r in self.evict_rows])
            scores = pool.scores[layer][slots].clone()  # [R, Hkv, C]
            recent = pool.pos[layer][slots] > (self.positions[rows] - window)[:, None, None]
            limit = torch.tensor([pool.slots[self.slots[r]].limit for r in self.evict_rows])
            unused = torch.arange(scores.shape[-1])[None, None, :] >= limit[:, None, None]
            scores[recent | unused] = float("inf")
            index[rows] = scores.argmin(-1)
        return index

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool = self.pool
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        index = self._write_index(layer)
        rows = self.slot_index[:, None].expand(b, hkv)
        heads = self.heads[None, :].expand(b, hkv)
        flat = self.flat_rows and not pool.args.layer_windows[layer]
        if flat:  # head-adaptive slots: the token's entries go to flat indices, all heads together
            fr = torch.tensor(self.flat_rows)
            entry = index[fr] * hkv + self.heads[None, :]
            cap = pool.layer_capacity[layer]
            heads, index = heads.clone(), index.clone()
            heads[fr], index[fr] = entry // cap, entry % cap
            pool.ensure_heads()
            pool.heads[layer][rows[fr], heads[fr], index[fr]] = self.heads[None, :].expand(len(fr), hkv)
        pool.k[layer][rows, heads, index] = k[:, :, 0]
        pool.v[layer][rows, heads, index] = v[:, :, 0]
        pool.pos[layer][rows, heads, index] = self.positions[:, None].expand(b, hkv)
        if self.track_scores:
            pool.scores[layer][rows, heads, index] = 0.0
        if self.sparse_rows and not pool.args.layer_windows[layer]:
            quest_pages.update(
                pool,
                layer,
                [self.slots[r] for r in self.sparse_rows],
                index[self.sparse_rows, 0],
                k[self.sparse_rows, :, 0],
            )

        valid = self._valid(layer)
        limit = int(valid.max())
        if self.contiguous:
            keys, values = pool.k[layer][:b, :, :limit], pool.v[layer][:b, :, :limit]
        else:
            keys, values = (
                pool.k[layer][self.slot_index, :, :limit],
                pool.v[layer][self.slot_index, :, :limit],
            )
        mask = None
        if int(valid.min()) < limit:
            mask = (torch.arange(limit)[None, :] < valid[:, None])[:, None, None, :]
        qg = q.view(b, hkv, hq // hkv, d)  # each KV head's query group attends as a tiny query block
        if self.track_scores:
            logits = (qg @ keys.transpose(-1, -2)) * pool.args.scaling
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            probs = logits.float().softmax(-1)
            out = probs.to(values.dtype) @ values
            pool.scores[layer][self.slot_index, :, :limit] += probs.sum(2)
        else:
            out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=pool.args.scaling)
        if self.sparse_rows and not pool.args.layer_windows[layer]:
            out = out.clone()
            for row in self.sparse_rows:  # Quest: attend over the selected pages only
                out[row] = quest_pages.attend(pool, layer, self.slots[row], qg[row], int(valid[row]))
        if flat:
            out = out.clone()
            for row in self.flat_rows:
                out[row] = self._attend_flat(layer, self.slots[row], qg[row])
        return out.view(b, hq, 1, d)

    def _attend_flat(self, layer: int, slot: int, qg: torch.Tensor) -> torch.Tensor:
        """One head-adaptive slot: each KV head's query group [Hkv, G, D] over the entries of that head."""
        keys, values, _, heads = self.pool.flat_entries(layer, slot)
        logits = (qg @ keys.T).float() * self.pool.args.scaling  # [Hkv, G, E]
        logits = logits.masked_fill(heads[None, None, :] != self.heads[:, None, None], float("-inf"))
        return logits.softmax(-1).to(values.dtype) @ values
