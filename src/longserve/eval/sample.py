"""The unit of evaluation shared by all task sources, plus the length-fitting helper they use.

Every task (synthetic, code, LongBench, custom) produces `Sample`s so that the runner, the metrics and the
report never need to know where a sample came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from longserve.errors import InvalidParameterError

CountTokens = Callable[[str], int]


@dataclass
class Sample:
    """One question over one long context. The model sees `context + question` (separators included)."""

    id: str
    task: str
    context: str
    question: str
    answers: list[str]
    metric: str = "string_match_all"
    max_new_tokens: int = 64
    target_tokens: int | None = None  # requested prompt length (synthetic tasks)
    actual_tokens: int | None = None  # prompt length in the evaluated model's tokens, when known
    depth: float | None = None  # relative position (0..1) of the needle/evidence, where meaningful
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.context + self.question

    @property
    def length_label(self) -> str:
        """Group key for "accuracy vs length": the requested length, else LongBench-E style buckets."""
        if self.target_tokens:
            return str(self.target_tokens)
        words = self.metadata.get("length")
        if isinstance(words, int):
            return "0-4k" if words < 4000 else "4-8k" if words < 8000 else "8k+"
        return "all"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_length(
    build: Callable[[int], tuple[str, str]],
    count_tokens: CountTokens,
    target: int,
    *,
    max_units: int,
    tolerance: int | None = None,
) -> tuple[int, tuple[str, str], int]:
    """Find the largest number of filler units `n` whose prompt `build(n)` still fits in `target` tokens.

    `build(n)` returns `(context, question)`; its token count must grow with `n`. A linear estimate from a
    small probe, a short gallop and a bisection keep this to a few (possibly slow) tokenizer calls. Returns
    `(n, (context, question), tokens)`; raises if the result misses `target` by more than `tolerance`
    (default: max(64, 5%)), which means the units are too coarse or the filler ran out.
    """
    cache: dict[int, int] = {}

    def tokens(n: int) -> int:
        if n not in cache:
            context, question = build(n)
            cache[n] = count_tokens(context + question)
        return cache[n]

    base = tokens(0)
    if base > target:
        raise InvalidParameterError(
            f"target length {target} tokens is too small: the task without filler already takes {base} tokens"
        )
    probe = min(max_units, 16)
    rate = max((tokens(probe) - base) / probe, 1e-3) if probe else 1.0
    guess = max(0, min(max_units, int((target - base) / rate)))
    # Gallop from the guess until the answer is bracketed: tokens(lo) <= target < tokens(hi).
    step = max(1, guess // 32)
    if tokens(guess) <= target:
        lo, hi = guess, max_units + 1  # hi = max_units + 1 stands for "all filler still fits"
        while lo < max_units:
            nxt = min(lo + step, max_units)
            if tokens(nxt) > target:
                hi = nxt
                break
            lo, step = nxt, step * 2
    else:
        hi = guess
        while True:
            lo = max(hi - step, 0)
            if tokens(lo) <= target:
                break
            hi, step = lo, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokens(mid) <= target:
            lo = mid
        else:
            hi = mid
    got = tokens(lo)
    allowed = tolerance if tolerance is not None else max(64, int(0.05 * target))
    if target - got > allowed:
        raise InvalidParameterError(
            f"could only fill {got} of the {target} requested tokens (tolerance {allowed}); "
            "use a shorter length or a task with more filler"
        )
    return lo, build(lo), got
