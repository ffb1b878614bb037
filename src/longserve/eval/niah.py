"""Needle-in-a-haystack tasks (RULER's niah_single/multikey/multivalue/multiquery) on the noise haystack.

Keys and values are drawn so they cannot collide with each other or the haystack, so substring scoring
stays exact; `depth` (a fraction of the haystack) places the asked needles, for depth sweeps.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

from longserve.errors import InvalidParameterError
from longserve.eval.sample import CountTokens, Sample
from longserve.eval.synthetic import NOISE, fit_sample, haystack, word_pool

_TYPES = {"number": "numbers", "word": "words", "uuid": "uuids"}
_NIAH_HEAD = (
    "Some special magic {t} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {t} afterwards.\n"
)
_NEEDLE = "One of the special magic {t} for {key} is: {value}."
_QUESTION = "\nWhat are all the special magic {t} for {keys} mentioned in the provided text?"


class _Values:
    """Draws unique keys and values that cannot collide with each other or the haystack."""

    def __init__(self, rng: random.Random, value_type: str):
        if value_type not in _TYPES:
            raise InvalidParameterError(f"unknown value_type {value_type!r}; choose from {', '.join(_TYPES)}")
        self.rng, self.value_type, self.seen = rng, value_type, set()
        self.words = word_pool(rng, NOISE + _NIAH_HEAD + _NEEDLE + _QUESTION)

    def _unique(self, make: Callable[[], str]) -> str:
        while (item := make()) in self.seen or any(item in s or s in item for s in self.seen):
            pass
        self.seen.add(item)
        return item

    def key(self) -> str:
        return self._unique(lambda: f"{self.rng.choice(self.words)}-{self.rng.choice(self.words)}")

    def value(self) -> str:
        rng = self.rng
        make = {
            "number": lambda: str(rng.randint(1_000_000, 9_999_999)),
            "word": lambda: rng.choice(self.words),
            "uuid": lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        }[self.value_type]
        return self._unique(make)


def _niah(
    kind: str,
    rng: random.Random,
    target_tokens: int,
    count_tokens: CountTokens,
    *,
    depth: float | None,
    value_type: str,
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
) -> Sample:
    """Shared NIAH body: `num_keys` keys (the first `num_queries` are asked), `num_values` values per key.

    `depth` places every needle of an asked key at that fraction of the haystack (distractor needles stay
    at random depths); without it every needle gets a random depth."""
    vals = _Values(rng, value_type)
    keys = [vals.key() for _ in range(num_keys)]
    table = {k: [vals.value() for _ in range(num_values)] for k in keys}
    t = _TYPES[value_type]
    needles_text = [_NEEDLE.format(t=t, key=k, value=v) for k in keys for v in table[k]]
    asked = keys[:num_queries]
    depths = [depth if depth is not None and k in asked else rng.random() for k in keys for _ in table[k]]
    needles = list(zip(depths, needles_text, strict=True))
    keys_text = ", ".join(asked[:-1]) + (" and " if len(asked) > 1 else "") + asked[-1]
    question = _QUESTION.format(t=t, keys=keys_text)
    head = _NIAH_HEAD.format(t=t)

    def build(n: int) -> tuple[str, str]:
        return head + haystack(n, needles) + "\n", question

    answers = [v for k in asked for v in table[k]]
    return fit_sample(
        kind,
        target_tokens,
        count_tokens,
        build,
        answers=answers,
        max_new_tokens=128,
        depth=depth if depth is not None else depths[0] if len(needles) == 1 else None,
        metadata={"keys": keys, "asked": asked, "needle_depths": depths, "value_type": value_type},
    )


def niah_single(
    rng: random.Random,
    target_tokens: int,
    count_tokens: CountTokens,
    *,
    depth: float | None = None,
    value_type: str = "number",
) -> Sample:
    """One needle, asked for directly."""
    return _niah("niah_single", rng, target_tokens, count_tokens, depth=depth, value_type=value_type)


def niah_multikey(
    rng: random.Random,
    target_tokens: int,
    count_tokens: CountTokens,
    *,
    depth: float | None = None,
    value_type: str = "number",
    num_keys: int = 4,
) -> Sample:
    """One asked needle plus `num_keys - 1` distractor needles with other keys."""
    return _niah(
        "niah_multikey",
        rng,
        target_tokens,
        count_tokens,
        depth=depth,
        value_type=value_type,
        num_keys=num_keys,
    )


def niah_multivalue(
    rng: random.Random,
    target_tokens: int,
    count_tokens: CountTokens,
    *,
    depth: float | None = None,
    value_type: str = "number",
    num_values: int = 4,
) -> Sample:
    """One key with `num_values` values scattered around; all must be returned."""
    return _niah(
        "niah_multivalue",
        rng,
        target_tokens,
        count_tokens,
        depth=depth,
        value_type=value_type,
        num_values=num_values,
    )


def niah_multiquery(
    rng: random.Random,
    target_tokens: int,
    count_tokens: CountTokens,
    *,
    depth: float | None = None,
    value_type: str = "number",
    num_queries: int = 4,
) -> Sample:
    """`num_queries` needles with different keys, all asked in one question."""
    return _niah(
        "niah_multiquery",
        rng,
        target_tokens,
        count_tokens,
        depth=depth,
        value_type=value_type,
        num_keys=num_queries,
        num_queries=num_queries,
    )
