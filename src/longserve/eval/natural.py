"""Needle tasks on a haystack of real prose: paragraphs of Python's own documentation.

Why: on the repeated "The grass is green." filler any scorer finds the one odd sentence, so KV policies
look better than they are. Here the haystack is the docstrings of standard-library modules (and the
interpreter's LICENSE text when it is installed), split into paragraphs, deduplicated and shuffled per
sample: nothing repeats, and the needle is one more sentence of ordinary English among many.

Deterministic given a seed on a given Python installation (the paragraphs come from the running
interpreter); `metadata["haystack_sha"]` fingerprints the paragraph pool so runs on different
installations can be told apart.

Tasks: `natural_single` (one locker number), `natural_multikey` (four people's locker numbers; the
sample asks the first, `metadata["questions"]` holds a question per key, for "compress once, ask many",
see `expand_questions`), `natural_multivalue` (four numbers of one person, all asked), `natural_prose`
(a fact told in a sentence of prose, asked in other words).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re
import sysconfig
import warnings
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from longserve.eval.sample import CountTokens, Sample, fit_length


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


SOURCE_MODULES = _words(
    "abc argparse ast asyncio base64 bisect calendar codecs collections concurrent.futures configparser "
    "contextlib copy csv dataclasses datetime decimal difflib dis email enum filecmp fnmatch fractions "
    "functools gettext glob gzip hashlib heapq hmac html.parser http.client http.server imaplib inspect io "
    "ipaddress itertools json locale logging mailbox mimetypes multiprocessing numbers operator optparse os "
    "pathlib pickle pkgutil platform pprint pydoc queue random re sched selectors shelve shlex shutil smtplib "
    "socket socketserver statistics string struct subprocess tarfile tempfile textwrap threading timeit "
    "tokenize traceback types typing unittest urllib.parse urllib.request uuid warnings weakref xml.dom "
    "zipfile"
)
HEAD = "Read the following text carefully. I will ask you a question about it afterwards.\n\n"
FIRST_NAMES = _words(
    "Ilse Marta Tomasz Anouk Henrik Soledad Kofi Ingrid Rafael Yuki Dagny Lorenzo Amara Bartholomew "
    "Fenna Oskar Priya Casimir Noemi Teodor Wilhelmina Emeka Ottilie Ruben"
)
SURNAMES = _words(
    "Varga Okonkwo Lindqvist Moreau Castellanos Nakamura Brennan Kowalczyk Haddad Petrov Sorensen "
    "Achterberg Quispe Fitzgerald Oyelaran Halvorsen Barbosa Kuznetsova Delacroix Matsuda"
)
SINGLE_NEEDLE = "The locker number for {name} is {value}."
SINGLE_QUESTION = "\n\nQuestion: What is the locker number for {name}?"
MULTI_NEEDLE = "One of the locker numbers for {name} is {value}."
MULTI_QUESTION = "\n\nQuestion: What are all the locker numbers for {name}?"
#: (statement, question, candidate answers): a fact told once in prose, asked in other words.
PROSE_FACTS = (
    (
        "{name} grew up in {answer}, and every summer still takes the night train back there to see an "
        "old aunt who runs a bakery near the harbour.",
        "In which city did {name} grow up?",
        "Tallinn Ljubljana Porto Bergen Valparaiso Trieste Utrecht Cusco Hobart Tromso Plovdiv Zanzibar",
    ),
    (
        "When the archive was reorganised last winter, {name} moved the signed contracts into a "
        "{answer} cabinet at the far end of the corridor, next to the broken radiator.",
        "What colour is the cabinet where {name} put the signed contracts?",
        "turquoise crimson amber violet ochre teal maroon lavender scarlet beige indigo saffron",
    ),
    (
        "For three years now {name} has been learning to play the {answer}, practising for an hour "
        "every morning before work while the neighbours are still asleep.",
        "Which instrument is {name} learning to play?",
        "cello oboe bassoon harp accordion banjo clarinet trombone ukulele harpsichord mandolin sitar",
    ),
    (
        "The dog that {name} adopted from the shelter last spring is called {answer}, after a "
        "character in an old radio play.",
        "What is the name of the dog that {name} adopted?",
        "Biscuit Juniper Waffles Marlowe Tofu Pickles Rasputin Clementine Noodle Barnaby Gnocchi Pimento",
    ),
)


def _prose(paragraph: str) -> bool:
    """Sentences of English, not code, tables or doctests: ends like a sentence; at most ~100 tokens,
    so the length fit can land within a paragraph of its target."""
    if not 80 <= len(paragraph) <= 400 or paragraph[-1] != "." or ">>>" in paragraph:
        return False
    return sum(c.isalpha() or c == " " for c in paragraph) / len(paragraph) > 0.9


def _split(doc: str | None) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc or "")]


def _docstrings(name: str) -> list[str]:
    try:
        module = importlib.import_module(name)
    except Exception:  # an optional module missing from this build: skip it (the sha tells)
        return []
    docs = [inspect.getdoc(module)]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            docs += [inspect.getdoc(m) for a, m in sorted(vars(obj).items()) if not a.startswith("_")]
    return [p for d in docs for p in _split(d)]


@lru_cache(maxsize=1)
def load_paragraphs() -> tuple[str, ...]:
    """The haystack pool: unique prose paragraphs of the standard library's docstrings and LICENSE,
    sorted (so a seed alone fixes the order a sample sees); paragraphs holding a six-digit run are
    dropped, so a locker number can only be found in its needle."""
    with warnings.catch_warnings():  # importing deprecated aliases (typing.io) warns; not our concern
        warnings.simplefilter("ignore")
        paragraphs = [p for name in SOURCE_MODULES for p in _docstrings(name)]
    license_txt = Path(sysconfig.get_path("stdlib")) / "LICENSE.txt"
    if license_txt.is_file():
        paragraphs += _split(license_txt.read_text("utf-8", errors="replace"))
    return tuple(sorted({p for p in paragraphs if _prose(p) and not re.search(r"\d{6}", p)}))


@lru_cache(maxsize=1)
def haystack_sha() -> str:
    return hashlib.sha256("\n\n".join(load_paragraphs()).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def _pool_words() -> frozenset[str]:
    return frozenset(re.findall(r"[a-z]+", " ".join(load_paragraphs()).lower()))


class _Draw:
    """Names and values that never occur in the haystack pool nor collide with each other."""

    def __init__(self, rng: random.Random):
        self.rng, self.seen = rng, set()
        words = _pool_words()
        self.first = [n for n in FIRST_NAMES if n.lower() not in words]
        self.last = [n for n in SURNAMES if n.lower() not in words]

    def name(self) -> str:
        while (name := f"{self.rng.choice(self.first)} {self.rng.choice(self.last)}") in self.seen or any(
            name.split()[0] == s.split()[0] for s in self.seen
        ):
            pass
        self.seen.add(name)
        return name

    def number(self) -> str:
        while (value := str(self.rng.randint(100_000, 999_999))) in self.seen:
            pass
        self.seen.add(value)
        return value

    def word(self, candidates: str) -> str:
        pool = [w for w in candidates.split() if w.lower() not in _pool_words() and w not in self.seen]
        word = self.rng.choice(pool)
        self.seen.add(word)
        return word


def _fit(
    kind: str,
    rng: random.Random,
    target: int,
    count_tokens: CountTokens,
    needles: list[tuple[float, str]],
    question: str,
    answers: list[str],
    metadata: dict,
    depth: float | None = None,
    max_new_tokens: int = 24,
) -> Sample:
    """Shuffle the pool with this sample's rng, then take as many paragraphs as fit `target` tokens
    with the needles inserted (as paragraphs of their own) at their depth fractions."""
    paragraphs = list(load_paragraphs())
    rng.shuffle(paragraphs)
    ordered = sorted(needles, key=lambda item: item[0])

    def build(n: int) -> tuple[str, str]:
        units = paragraphs[:n]
        for offset, (d, text) in enumerate(ordered):
            units.insert(round(d * n) + offset, text)
        return HEAD + "\n\n".join(units), question

    n, (context, question), got = fit_length(build, count_tokens, target, max_units=len(paragraphs))
    return Sample(
        id="",
        task=kind,
        context=context,
        question=question,
        answers=answers,
        max_new_tokens=max_new_tokens,
        target_tokens=target,
        actual_tokens=got,
        depth=depth,
        metadata={"filler_units": n, "haystack_sha": haystack_sha(), **metadata},
    )


def natural_single(
    rng: random.Random, target_tokens: int, count_tokens: CountTokens, *, depth: float | None = None
) -> Sample:
    """One "The locker number for <name> is <6 digits>." among the paragraphs; asked directly."""
    draw = _Draw(rng)
    name, value = draw.name(), draw.number()
    depth = rng.random() if depth is None else depth
    needle = SINGLE_NEEDLE.format(name=name, value=value)
    return _fit(
        "natural_single",
        rng,
        target_tokens,
        count_tokens,
        [(depth, needle)],
        SINGLE_QUESTION.format(name=name),
        [value],
        {"names": [name]},
        depth=depth,
    )


def natural_multikey(
    rng: random.Random,
    target_tokens: int,
    count_tokens: CountTokens,
    *,
    depth: float | None = None,
    num_keys: int = 4,
) -> Sample:
    """`num_keys` people's locker numbers at random depths. The sample asks for the first person;
    `metadata["questions"]` asks for each in turn (one context, several separate questions)."""
    draw = _Draw(rng)
    names = [draw.name() for _ in range(num_keys)]
    values = [draw.number() for _ in range(num_keys)]
    depths = [rng.random() for _ in range(num_keys)]
    needles = [
        (d, SINGLE_NEEDLE.format(name=n, value=v)) for d, n, v in zip(depths, names, values, strict=True)
    ]
    questions = [
        {"question": SINGLE_QUESTION.format(name=n), "answers": [v], "depth": d}
        for n, v, d in zip(names, values, depths, strict=True)
    ]
    return _fit(
        "natural_multikey",
        rng,
        target_tokens,
        count_tokens,
        needles,
        questions[0]["question"],
        questions[0]["answers"],
        {"names": names, "questions": questions},
        depth=depths[0],
    )


def natural_multivalue(
    rng: random.Random,
    target_tokens: int,
    count_tokens: CountTokens,
    *,
    depth: float | None = None,
    num_values: int = 4,
) -> Sample:
    """One person with `num_values` locker numbers scattered through the text; all must be named."""
    draw = _Draw(rng)
    name = draw.name()
    values = [draw.number() for _ in range(num_values)]
    depths = [rng.random() for _ in range(num_values)]
    needles = [(d, MULTI_NEEDLE.format(name=name, value=v)) for d, v in zip(depths, values, strict=True)]
    return _fit(
        "natural_multivalue",
        rng,
        target_tokens,
        count_tokens,
        needles,
        MULTI_QUESTION.format(name=name),
        values,
        {"names": [name], "needle_depths": depths},
        max_new_tokens=48,
    )


def natural_prose(
    rng: random.Random, target_tokens: int, count_tokens: CountTokens, *, depth: float | None = None
) -> Sample:
    """A fact stated once in a sentence of prose (a home town, a colour, an instrument, a dog's name)
    and asked in other words, so the answer is not a string the question repeats."""
    draw = _Draw(rng)
    statement, question, candidates = PROSE_FACTS[rng.randrange(len(PROSE_FACTS))]
    name, answer = draw.name(), draw.word(candidates)
    depth = rng.random() if depth is None else depth
    return _fit(
        "natural_prose",
        rng,
        target_tokens,
        count_tokens,
        [(depth, statement.format(name=name, answer=answer))],
        "\n\nQuestion: " + question.format(name=name),
        [answer],
        {"names": [name], "fact": statement.format(name=name, answer=answer)},
        depth=depth,
    )


def expand_questions(samples: Sequence[Sample]) -> list[Sample]:
    """One sample per question: a multi-key sample becomes one sample per key (same context, ids
    `<id>/q<j>`), the others pass through; for running "compress once, ask many" as plain samples."""
    out = []
    for s in samples:
        questions = s.metadata.get("questions")
        if not questions:
            out.append(s)
            continue
        for j, q in enumerate(questions):
            out.append(
                replace(
                    s, id=f"{s.id}/q{j}", question=q["question"], answers=list(q["answers"]), depth=q["depth"]
                )
            )
    return out
