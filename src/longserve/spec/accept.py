"""Acceptance rules of speculative decoding: which draft tokens the target keeps, and the next token.

Greedy: keep drafts while they equal the target's argmax, then emit the target's argmax, so the output
is token for token the target's greedy output. Stochastic (Leviathan et al., 2023; Chen et al., 2023):
keep draft x ~ q with probability min(1, p(x)/q(x)); on the first rejection emit a sample of
norm(max(0, p - q)); after k acceptances emit a bonus sample of the target's next distribution. Every
emitted token is then distributed exactly as a sample from p, whatever the draft is.
"""

from __future__ import annotations

import torch


def greedy_accept(drafts: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """drafts (k), target logits [k+1, V] -> (accepted drafts n, the target's token after them)."""
    best = target_logits.argmax(-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return n, best[n]


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)); falls back to p when p <= q everywhere (only possible up to rounding)."""
    r = (p - q).clamp_min(0)
    total = r.sum()
    return r / total if total > 0 else p


def stochastic_accept(
    drafts: list[int], q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """drafts (k) sampled from q [k, V]; target probabilities p [k+1, V] -> (accepted n, next token)."""
    k = len(drafts)
    if k:
        index = torch.arange(k)
        tokens = torch.tensor(drafts)
        p_x, q_x = p[index, tokens], q[index, tokens]
        u = torch.rand(k, generator=generator, dtype=p.dtype)
        # u < p/q, written without dividing so that q(x) = 0 (never drawn) cannot produce a NaN
        ok = (u * q_x < p_x).tolist()
        n = ok.index(False) if False in ok else k
    else:
        n = 0
    dist = p[n] if n == k else residual(p[n], q[n])
    return n, int(torch.multinomial(dist, 1, generator=generator))
