"""RULER-style synthetic long-context tasks, generated offline and deterministically.

Why synthetic: the answer position and the context length are under our control, so accuracy can be plotted
against length, depth and KV budget without any dataset download. Lengths are measured in the evaluated
model's own tokens (a `count_tokens` callable) and filled by `fit_length`.

Differences from RULER (Hsieh et al., 2024): only the "noise" haystack is used (no essays), so the
niah_single_1/2/3 variants (in `niah`) differ in the value type (number / word / uuid) only; coded words for `fwe` get
exact Zipf counts instead of sampled ones so the top-3 is never tied.
"""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from importlib import resources
from itertools import islice

from longserve.errors import InvalidParameterError
from longserve.eval.sample import CountTokens, Sample, fit_length

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
MAX_UNITS = 1 << 22

Generator = Callable[..., Sample]


def filler_passkey_prompt(key: int, n_filler: int, depth: float) -> str:
    """The classic pass-key prompt over `n_filler` repeats of the noise sentence (raw text, no template).

    The easy haystack: the integration tests and the dtype-agreement bench use it because any scorer
    finds the one odd sentence, so a wrong answer there points at the engine, not at compression."""
    parts = [NOISE + " "] * n_filler
    parts.insert(int(n_filler * depth), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    return (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n"
        + "".join(parts)
        + "\nWhat is the pass key? The pass key is"
    )


@lru_cache(maxsize=1)
def load_words() -> tuple[str, ...]:
    """The shipped word list (`longserve/data/eval_words.txt`), sorted, comments dropped."""
    text = resources.files("longserve").joinpath("data/eval_words.txt").read_text("utf-8")
    return tuple(w for w in (line.strip() for line in text.splitlines()) if w and not w.startswith("#"))


def word_pool(rng: random.Random, avoid: str) -> list[str]:
    """Shuffled words that never occur inside `avoid` (templates, haystack), so answers stay unique."""
    avoid = avoid.lower()
    pool = [w for w in load_words() if w not in avoid]
    rng.shuffle(pool)
    return pool


def insert_needles(units: Sequence[str], needles: Iterable[tuple[float, str]]) -> str:
    """Join filler units with needles inserted between units at relative depths (stable for ties)."""
    out = list(units)
    for offset, (depth, needle) in enumerate(sorted(needles, key=lambda item: item[0])):
        out.insert(round(depth * len(units)) + offset, needle)
    return " ".join(out)


def haystack(n: int, needles: list[tuple[float, str]]) -> str:
    """`n` noise units with `needles` (depth, text) inserted at their depth fractions."""
    return insert_needles([NOISE] * n, needles)


def fit_sample(kind: str, target: int, count_tokens: CountTokens, build, **fields) -> Sample:
    """Fill `build` up to `target` tokens and wrap the result in a `Sample` (id is set by `make_suite`)."""
    n, (context, question), got = fit_length(build, count_tokens, target, max_units=MAX_UNITS)
    metadata = {"filler_units": n, **fields.pop("metadata", {})}
    return Sample(
        id="",
        task=kind,
        context=context,
        question=question,
        target_tokens=target,
        actual_tokens=got,
        metadata=metadata,
        **fields,
    )


def passkey(
    rng: random.Random,
    target_tokens: int,
    count_tokens: CountTokens,
    *,
    depth: float | None = None,
    digits: int = 5,
) -> Sample:
    """Classic pass-key retrieval (Mohtashami & Jaggi, 2023) at a controlled depth."""
    depth = rng.random() if depth is None else depth
    key = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    head = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n"
    )
    needle = f"The pass key is {key}. Remember it."

    def build(n: int) -> tuple[str, str]:
        return head + haystack(n, [(depth, needle)]) + "\n", "What is the pass key?"

    return fit_sample(
        "passkey", target_tokens, count_tokens, build, answers=[key], max_new_tokens=16, depth=depth
    )


# --------------------------------------------------------------------------- aggregation / tracing


def vt(
    rng: random.Random,
    target_tokens: int,
    count_tokens: CountTokens,
    *,
    depth: float | None = None,
    num_chains: int = 1,
    num_hops: int = 4,
) -> Sample:
    """Variable tracking: follow `VAR B = VAR A` chains; answer every variable holding the asked value."""
    names: set[str] = set()

    def var() -> str:
        while (v := "".join(rng.choices(string.ascii_uppercase, k=5))) in names:
            pass
        names.add(v)
        return v

    chains, values = [], []
    for _ in range(num_chains):
        chain = [var() for _ in range(num_hops + 1)]
        while (value := str(rng.randint(10_000, 99_999))) in values:
            pass
        chains.append(chain)
        values.append(value)
    needles = []
    for chain, value in zip(chains, values, strict=True):
        statements = [f"VAR {chain[0]} = {value}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:], strict=False)
        ]
        needles += list(zip(sorted(rng.random() for _ in statements), statements, strict=True))
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above."

    def build(n: int) -> tuple[str, str]:
        return head + haystack(n, needles) + "\n", question

    return fit_sample(
        "vt",
        target_tokens,
        count_tokens,
        build,
        answers=list(chains[0]),
        max_new_tokens=30,
        metadata={"chains": chains, "values": values},
    )


def cwe(
    rng: random.Random,
    target_tokens: int,
    count_tokens: CountTokens,
    *,
    depth: float | None = None,
    num_cw: int = 10,
    freq_cw: int | None = None,
    freq_ucw: int = 3,
) -> Sample:
    """Common words extraction: a numbered word list where `num_cw` words are much more frequent.

    Fillers are uncommon words (each `freq_ucw` times); once the vocabulary is used up it is cycled, and the
    common words' frequency grows to stay at least twice the largest uncommon frequency. `freq_cw` defaults
    to RULER's 30, scaled down for short targets so the common words alone cannot overflow them.
    """
    if freq_cw is None:
        freq_cw = min(30, max(4, target_tokens // (num_cw * 16)))
    pool = word_pool(rng, "")
    # Answers must not hide inside other words ("art" in "start"), or substring scoring would over-credit.
    common = list(islice((w for w in pool if not any(w in v for v in pool if v != w)), num_cw))
    uncommon = [w for w in pool if w not in common]
    shuffle_seed = rng.random()
    head = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n"
    )
    question = f"\nQuestion: What are the {num_cw} most common words in the above list?"

    def build(n: int) -> tuple[str, str]:
        cycles = -(-n // len(uncommon))
        words = [uncommon[i % len(uncommon)] for i in range(n)] * freq_ucw
        words += common * max(freq_cw, 2 * freq_ucw * cycles)
        random.Random(shuffle_seed).shuffle(words)
        return head + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)) + "\n", question

    return fit_sample("cwe", target_tokens, count_tokens, build, answers=list(common), max_new_tokens=120)


def fwe(
    rng: random.Random,
    target_tokens: int,
    count_tokens: CountTokens,
    *,
    depth: float | None = None,
    alpha: float = 2.0,
    vocab_size: int = 1000,
    num_answers: int = 3,
) -> Sample:
    """Frequent words extraction: coded words with exact Zipf counts; answer the `num_answers` most frequent."""
    unique: dict[str, None] = {}  # equal-length words cannot contain each other, which keeps scoring exact
    while len(unique) < vocab_size:
        unique["".join(rng.choices(string.ascii_lowercase, k=6))] = None
    vocab = list(unique)
    shuffle_seed = rng.random()
    head = (
        "Read the following coded text and track the frequency of each coded word. "
        f"Find the {num_answers} most frequently appeared coded words.\n"
    )
    question = (
        "\nQuestion: Do not provide any explanation. "
        f"What are the {num_answers} most frequently appeared words in the above coded text?"
    )

    def counts(n: int) -> list[int]:
        return [c for c in (int(n / (rank + 1) ** alpha) for rank in range(vocab_size)) if c > 0]

    def build(n: int) -> tuple[str, str]:
        words = [vocab[rank] for rank, c in enumerate(counts(n)) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(words)
        return head + " ".join(words) + "\n", question

    sample = fit_sample(
        "fwe", target_tokens, count_tokens, build, answers=vocab[:num_answers], max_new_tokens=50
    )
    top = counts(sample.metadata["filler_units"])[: num_answers + 1]
    top += [0] * (num_answers + 1 - len(top))
    if any(top[i] <= top[i + 1] for i in range(num_answers)):
        raise InvalidParameterError(f"fwe needs a longer target than {target_tokens} tokens to avoid ties")
    return sample


def word_counts(numbered_list: str) -> Counter[str]:
    """Counts of the words in a `cwe` list ("1. foo 2. bar ..."); handy for checks and tests."""
    return Counter(t for t in numbered_list.split() if t.isalpha())
