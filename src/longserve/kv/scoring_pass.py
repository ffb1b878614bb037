"""A scoring pass: extra tokens run over an uncompressed prompt only to score its cache entries.

Some policies cannot judge a token from the prompt's own queries: KVzip (Kim et al., 2025) asks the
model to *reconstruct* the context and keeps the entries that reconstruction attends to, which needs
no question ("compress once, ask many"). The pass runs the policy's `ScoringChunk`s through the model
on top of the staged prompt KV. It writes nothing: each chunk's queries attend to the whole prompt and
to themselves (so the hidden states of later layers are the model's own), and the softmax of those
queries over (sinks + the chunk's entries + themselves) gives each entry of the chunk a score, maxed
over the queries and over each KV head's query group. `run_scoring_pass` returns one `[Hkv, L]` score
tensor per global layer (None for sliding-window layers, which are never compressed).

Cost: about one prefill of the chunk's tokens over the prompt. The attention is three fused
(flash) calls over disjoint key sets, the scored set S (sinks + the chunk's entries), the rest of the
prompt, and the pass tokens themselves (causal), merged exactly by their log-sum-exps; the score's
normaliser is the LSE over S and the pass tokens, which those calls already give. What remains is one
fp32 `q @ k_chunk` per block of `query_block` queries and a max over it: since exp is monotone,
max_q exp(l_q - lse_q) = exp(max_q (l_q - lse_q)), so no [H, T, L] softmax is ever materialized or
exponentiated (the first version did, and cost 13x a prefill).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longserve.kv import attention_kernels as kernels
from longserve.kv.cache import KVPool
from longserve.kv.policies import ScoringChunk
from longserve.model import CausalLM


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    query_block: int,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [1, Hq, T, D], lse [1, Hq, T] fp32) of q [1, Hq, T, D] over k/v [1, Hkv, L, D] (GQA),
    `causal` top-left aligned (T == L). `fused` (default: on CPU) uses the flash-for-CPU kernel;
    otherwise fp32 math, `query_block` queries at a time."""
    if fused if fused is not None else q.device.type == "cpu":
        return kernels.flash_lse(q, k, v, causal, scale)
    _, hq, t, _ = q.shape
    group = hq // k.shape[1]
    keys, values = k[0].repeat_interleave(group, 0).float(), v[0].repeat_interleave(group, 0).float()
    outs, lses = [], []
    for b0 in range(0, t, query_block):
        b1 = min(t, b0 + query_block)
        logits = (q[0, :, b0:b1].float() @ keys.transpose(1, 2)) * scale
        if causal:
            rows = torch.arange(b0, b1, device=q.device)[:, None]
            logits.masked_fill_(torch.arange(keys.shape[1], device=q.device)[None, :] > rows, float("-inf"))
        lse = logits.logsumexp(-1)
        outs.append((logits - lse[..., None]).exp_() @ values)
        lses.append(lse)
    return torch.cat(outs, 1)[None], torch.cat(lses, 1)[None]


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
        scale = pool.args.scaling
        window = pool.args.layer_windows[layer]
        if window:  # never compressed, never scored: plain attention over the ring
            pk, pv, ppos = self.ring[0].layer_entries(layer, self.ring[1])
            return kernels.chunk_attention(q, k, v, pk, pv, self.positions, ppos, scale, window)
        pk, pv, _ = pool.layer_entries(layer, slot)
        n_sink, c0, c1 = min(self.chunk.n_sink, self.chunk.start), self.chunk.start, self.chunk.end
        block = self.query_block
        # the keys in three disjoint sets: the pass tokens (causal), the chunk's entries, the rest of
        # the prompt (sinks included; a copy only when the chunk sits in the middle of the prompt)
        own = attention_lse(q, k, v, True, scale, block)
        parts = [own]
        if c1 > c0:
            parts.append(attention_lse(q, pk[None, :, c0:c1], pv[None, :, c0:c1], False, scale, block))
        if c0 > 0 or c1 < pk.shape[1]:
            rest_k, rest_v = (torch.cat([x[:, :c0], x[:, c1:]], 1)[None] for x in (pk, pv))
            parts.append(attention_lse(q, rest_k, rest_v, False, scale, block))
        if c1 > c0:
            hkv, _, d = pk.shape
            qg = q[0].reshape(hkv, -1, d)  # [Hkv, G*T, D]: each KV head's query group as rows
            norm = torch.logaddexp(own[1][0], parts[1][1][0]).reshape(hkv, -1)  # over pass + chunk
            if n_sink:
                sink_logits = qg.float() @ pk[:, :n_sink].float().transpose(1, 2) * scale
                norm = torch.logaddexp(norm, sink_logits.logsumexp(-1))
            self._score(layer, qg, pk[:, c0:c1], norm)
        return kernels.merge(parts, q.dtype)

    def _score(self, layer: int, qg: torch.Tensor, part_k: torch.Tensor, norm: torch.Tensor) -> None:
        """scores[layer][:, c0:c1] = max(itself, max over each KV head's queries of exp(logit - norm)).

        The best query of each entry is found with one matmul in the model's dtype (bf16 runs on the
        CPU's matrix units, ~10x fp32), [k, 1, 1] . [q * scale, -norm_hi, -norm_lo] (the normaliser
        split in two so that the dtype's rounding applies to logit - norm, small near the maximum,
        not to either alone); the winner's score is then recomputed in fp32, so the result is the
        exact score of a query within rounding of the best one (the best one itself in fp32)."""
        hkv, rows, d = qg.shape
        scale = self.src[0].args.scaling
        dtype = qg.dtype
        hi = norm.to(dtype)
        lo = (norm - hi.float()).to(dtype)
        qa = torch.cat([qg.transpose(1, 2) * scale, -hi[:, None], -lo[:, None]], 1)  # [Hkv, D + 2, G*T]
        ka = F.pad(part_k, (0, 2), value=1.0)  # [Hkv, C, D + 2]
        step = max(1, self.query_block * (rows // max(1, len(self.positions))))
        best, arg = None, None
        for r0 in range(0, rows, step):
            top, idx = torch.bmm(ka, qa[..., r0 : r0 + step]).max(-1)  # [Hkv, C]: reduced along rows
            if best is None:
                best, arg = top, idx
            else:
                better = top > best
                best, arg = torch.where(better, top, best), torch.where(better, idx + r0, arg)
        winner = qg.gather(1, arg[..., None].expand(-1, -1, d)).float()  # [Hkv, C, D]
        exact = (winner * part_k.float()).sum(-1) * scale - norm.gather(1, arg)
        row = self.scores[layer][:, self.chunk.start : self.chunk.end]
        torch.maximum(row, exact.exp_(), out=row)


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
