"""Which demonstrations go into the prompt, and in what order.

Many-shot results are very sensitive to both (Upasani et al., 2026), so they are explicit, seeded
choices: `random`, `similar` (nearest to the query, or to the test set's centroid for a static block),
`diverse` (greedy k-center: cover the pool), `balanced` (round-robin over labels); orderings `random`,
`similar-last` (most similar next to the query) and `by-label`.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from longserve.errors import InvalidParameterError
from longserve.icl.tasks import Example

Embed = Callable[[list[str]], torch.Tensor]  # texts -> [N, D] unit vectors

SELECTIONS = ("random", "similar", "diverse", "balanced")
ORDERINGS = ("random", "similar-last", "by-label")


def select(
    pool: Sequence[Example],
    k: int,
    how: str = "random",
    *,
    seed: int = 0,
    embed: Embed | None = None,
    anchor: torch.Tensor | None = None,
) -> list[Example]:
    """`k` demonstrations from `pool`. `similar` ranks by cosine to `anchor` (a query embedding or a
    centroid); `similar` and `diverse` need `embed`."""
    if how not in SELECTIONS:
        raise InvalidParameterError(f"unknown selection {how!r}: use one of {', '.join(SELECTIONS)}")
    if not 0 <= k <= len(pool):
        raise InvalidParameterError(f"cannot select {k} demonstrations from a pool of {len(pool)}")
    rng = random.Random(seed)
    if k == 0:
        return []
    if how == "random":
        return rng.sample(list(pool), k)
    if how == "balanced":
        return _balanced(pool, k, rng)
    if embed is None:
        raise InvalidParameterError(f"selection {how!r} needs an embedding model")
    vectors = embed([ex.input for ex in pool])
    if how == "similar":
        if anchor is None:
            raise InvalidParameterError("selection 'similar' needs a query (or centroid) to compare with")
        order = torch.argsort(vectors @ anchor, descending=True, stable=True)
        return [pool[i] for i in order[:k].tolist()]
    return [pool[i] for i in k_center(vectors, k)]


def _balanced(pool: Sequence[Example], k: int, rng: random.Random) -> list[Example]:
    by_label: dict[str | None, list[Example]] = defaultdict(list)
    for ex in pool:
        by_label[ex.label].append(ex)
    queues = [
        rng.sample(items, len(items)) for _, items in sorted(by_label.items(), key=lambda kv: str(kv[0]))
    ]
    out: list[Example] = []
    while len(out) < k:
        for queue in queues:
            if queue and len(out) < k:
                out.append(queue.pop())
    return out


def k_center(vectors: torch.Tensor, k: int) -> list[int]:
    """Greedy farthest-first traversal, starting from the point nearest the centroid: each new point is
    the one farthest from everything chosen so far (a 2-approximation of the k-center cover)."""
    centroid = vectors.mean(0)
    chosen = [int(torch.argmin(((vectors - centroid) ** 2).sum(-1)))]
    distance = ((vectors - vectors[chosen[0]]) ** 2).sum(-1)
    while len(chosen) < k:
        nxt = int(torch.argmax(distance))
        chosen.append(nxt)
        distance = torch.minimum(distance, ((vectors - vectors[nxt]) ** 2).sum(-1))
    return chosen


def order(
    demos: list[Example],
    how: str = "random",
    *,
    seed: int = 0,
    embed: Embed | None = None,
    anchor: torch.Tensor | None = None,
) -> list[Example]:
    if how not in ORDERINGS:
        raise InvalidParameterError(f"unknown ordering {how!r}: use one of {', '.join(ORDERINGS)}")
    if not demos:
        return []
    if how == "random":
        return random.Random(seed).sample(demos, len(demos))
    if how == "by-label":
        return sorted(demos, key=lambda ex: str(ex.label))
    if embed is None or anchor is None:
        raise InvalidParameterError("ordering 'similar-last' needs an embedding model and a query")
    similarity = (embed([ex.input for ex in demos]) @ anchor).tolist()
    return [ex for _, ex in sorted(zip(similarity, demos, strict=True), key=lambda pair: pair[0])]
