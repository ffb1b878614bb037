"""A scoring pass: extra tokens run over an uncompressed prompt only to score its cache entries.

Some policies cannot judge a token from the prompt's own queries: KVzip (Kim et al., 2025) asks the
model to *reconstruct* the context and keeps the entries that reconstruction attends to, which needs
no question ("compress once, ask many"). The pass runs the policy's `ScoringChunk`s through the model
on top of the staged prompt KV. It writes nothing: each chunk's queries attend to the whole prompt and
to themselves (so the hidden states of later layers are the model's own), and the softmax of those
queries over (sinks + the chunk's entries + themselves) gives each entry of the chunk a score, maxed
over the queries and over each KV head's query group. `run_scoring_pass` returns one `[Hkv, L]` score
tensor per global layer (None for sliding-window layers, which are never compressed).

Memory stays bounded for long prompts: the policy cuts the prompt into chunks, and each chunk's
queries are processed `query_block` at a time (logits are `[Hq, query_block, L + chunk]`).
"""

from __future__ import annotations

import torch

from longserve.kv.cache import KVPool
from longserve.kv.policies import ScoringChunk
from longserve.model import CausalLM


class ScoringBackend:
    """Attention for one scoring chunk at `positions` (right after the prompt): reads the prompt's
    entries (global layers from `src`, sliding-window rings from `ring`), accumulates scores, writes
    nothing."""

    def __init__(
        self,
        src: tuple[KVPool, int],
        ring: tuple[KVPool, int],
        chunk: ScoringChunk,
        positions: torch.Tensor,
        scores: list[torch.Tensor | None],
        query_block: int = 512,
    ):
        self.src, self.ring, self.chunk, self.positions = src, ring, chunk, positions
        self.scores, self.query_block = scores, query_block

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool, slot = self.src
        window = pool.args.layer_windows[layer]
        if window:
            pool, slot = self.ring
        pk, pv, ppos = pool.layer_entries(layer, slot)
        hkv, n_ctx = pk.shape[0], pk.shape[1]
        keys, values = torch.cat([pk, k[0]], 1), torch.cat([pv, v[0]], 1)
        key_pos = torch.cat([ppos[0], self.positions])
        _, hq, t, d = q.shape
        group = hq // hkv
        chunk = self.chunk
        n_sink, c0, c1 = min(chunk.n_sink, chunk.start), chunk.start, chunk.end
        out = torch.empty_like(q[0])
        best = None
        for b0 in range(0, t, self.query_block):
            b1 = min(t, b0 + self.query_block)
            qb = q[0, :, b0:b1].reshape(hkv, group * (b1 - b0), d)
            logits = (qb @ keys.transpose(1, 2)).float().view(hkv, group, b1 - b0, -1)
            q_pos = self.positions[b0:b1, None]
            mask = key_pos[None, :] <= q_pos
            if window:
                mask &= (q_pos - key_pos[None, :]) < window
            logits.mul_(pool.args.scaling).masked_fill_(~mask, float("-inf"))
            # one exp serves both softmaxes: the model's over every key (the pass's own output) and
            # the score's over the sinks, the chunk's entries and the pass tokens
            weights = (logits - logits.amax(-1, keepdim=True)).exp_()
            total = weights.sum(-1, keepdim=True)
            if not window:
                own = weights[..., :n_sink].sum(-1, keepdim=True) + weights[..., n_ctx:].sum(-1, keepdim=True)
                part = weights[..., c0:c1]
                den = (own + part.sum(-1, keepdim=True)).clamp_min(torch.finfo(part.dtype).tiny)
                part = (part / den).amax(dim=(1, 2))  # max over the query group and the queries
                best = part if best is None else torch.maximum(best, part)
            probs = weights.div_(total).to(values.dtype).view(hkv, group * (b1 - b0), -1)
            out[:, b0:b1] = (probs @ values).view(hq, b1 - b0, d)
        if best is not None:
            row = self.scores[layer][:, chunk.start : chunk.end]
            torch.maximum(row, best, out=row)
        return out[None]


@torch.inference_mode()
def run_scoring_pass(
    model: CausalLM,
    src: tuple[KVPool, int],
    ring: tuple[KVPool, int],
    chunks: list[ScoringChunk],
    start_pos: int,
    query_block: int = 512,
) -> list[torch.Tensor | None]:
    """Scores [Hkv, L] per global layer (None for sliding-window layers) of the `L` prompt entries
    held in `src` (sliding rings in `ring`), from every chunk in turn, run at positions from
    `start_pos` (the prompt's next position). Entries no chunk scores keep 0; the first `n_sink`
    entries get the largest possible score, 1."""
    pool, slot = src
    args = pool.args
    n_ctx = pool.slots[slot].fill
    dev = pool.device
    scores: list[torch.Tensor | None] = [
        None if args.layer_windows[layer] else torch.zeros(args.n_kv_heads, n_ctx, device=dev)
        for layer in range(args.n_layers)
    ]
    for layer_scores in scores:
        if layer_scores is not None and chunks:
            layer_scores[:, : chunks[0].n_sink] = 1.0
    for chunk in chunks:
        if not 0 <= chunk.start <= chunk.end <= n_ctx:
            raise ValueError(
                f"scoring chunk [{chunk.start}, {chunk.end}) is outside the {n_ctx} prompt entries"
            )
        positions = torch.arange(start_pos, start_pos + len(chunk.ids), device=dev)
        backend = ScoringBackend(src, ring, chunk, positions, scores, query_block)
        model(torch.tensor([chunk.ids], device=dev), positions[None], backend)
    return scores
