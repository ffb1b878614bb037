"""Offline, seeded tasks where demonstrations carry information, plus user JSONL datasets.

Each generated task hides a rule the model cannot know without examples (which category maps to which
label, the cipher's shift, the function's coefficients, the output schema), so accuracy against the
number of shots measures adaptation through context, not prior knowledge. Every task has an exact
metric and a checker that explains a wrong answer (the execution feedback ACE's reflector reads).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from longserve.errors import InvalidParameterError


@dataclass(frozen=True)
class Example:
    input: str
    target: str
    label: str | None = None  # class (or intent) of the example: `balanced` selection and `by-label` order


@dataclass
class Task:
    name: str
    instruction: str
    examples: list[Example]
    max_new_tokens: int = 16
    json_output: bool = False  # compare parsed JSON instead of text
    meta: dict = field(default_factory=dict)
    #: where a plain-text answer ends: one line, unless the task's answers span lines (code)
    stop: tuple[str, ...] = ("\n",)

    @property
    def single_line(self) -> bool:
        return "\n" in self.stop

    def score(self, prediction: str, example: Example) -> float:
        return 1.0 if self.check(prediction, example)[0] else 0.0

    def check(self, prediction: str, example: Example) -> tuple[bool, str]:
        """(correct, feedback): the feedback names what was expected, as a test harness would."""
        if self.json_output:
            got, want = first_json(prediction), json.loads(example.target)
            if got is None:
                return False, f"the answer is not a JSON object; expected {example.target}"
            if got == want:
                return True, "correct"
            return False, f"wrong JSON: got {json.dumps(got)}, expected {example.target}"
        got = normalize(prediction)
        if got == normalize(example.target):
            return True, "correct"
        return False, f"wrong answer: got {got!r}, expected {example.target!r}"

    def split(self, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
        """Disjoint train (demonstration pool) and test sets."""
        if n_train + n_test > len(self.examples):
            raise InvalidParameterError(
                f"task {self.name!r} has {len(self.examples)} examples, asked for {n_train} + {n_test}"
            )
        shuffled = random.Random(seed).sample(self.examples, len(self.examples))
        return shuffled[:n_train], shuffled[n_train : n_train + n_test]


def normalize(text: str) -> str:
    """The first non-empty line, stripped of quotes, trailing punctuation and case."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(output|answer)\s*:\s*", "", line.strip(), flags=re.I)
    return line.strip().strip("\"'`").rstrip(".!").strip().casefold()


def first_json(text: str) -> dict | None:
    """The first balanced `{...}` in `text` that parses as JSON."""
    start = text.find("{")
    while start != -1:
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                try:
                    value = json.loads(text[start : end + 1])
                    return value if isinstance(value, dict) else None
                except json.JSONDecodeError:
                    break
        start = text.find("{", start + 1)
    return None


# ---- generated tasks ---------------------------------------------------------------------------
_CATEGORIES = {
    "fruit": ["apple", "pear", "mango", "plum", "cherry", "lemon", "peach", "grape"],
    "animal": ["otter", "horse", "falcon", "badger", "lizard", "rabbit", "salmon", "beetle"],
    "tool": ["hammer", "wrench", "chisel", "shovel", "ladder", "needle", "drill", "saw"],
    "vehicle": ["truck", "canoe", "tram", "bicycle", "glider", "ferry", "scooter", "wagon"],
}
_ADJECTIVES = ["small", "old", "bright", "heavy", "quiet", "red", "wet", "broken", "new", "tiny"]
_PLACES = ["the garden", "the station", "the shed", "the river", "the market", "the attic", "the road"]
_WORDS = [
    "river",
    "stone",
    "cloud",
    "garden",
    "window",
    "silver",
    "market",
    "rocket",
    "pencil",
    "summer",
    "winter",
    "basket",
    "candle",
    "forest",
    "bridge",
    "castle",
    "planet",
    "dragon",
    "mirror",
    "needle",
    "orange",
    "violin",
    "yellow",
    "harbor",
    "jungle",
    "lantern",
    "meadow",
    "noodle",
    "pepper",
    "quartz",
    "saddle",
    "tunnel",
    "velvet",
    "walnut",
    "zipper",
    "anchor",
    "bottle",
    "copper",
]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def unique_examples(make: Callable[[], Example], n: int, task: str) -> list[Example]:
    """`n` examples with distinct inputs (a query must never also stand among the demonstrations)."""
    seen: dict[str, Example] = {}
    for _ in range(50 * n):
        ex = make()
        seen.setdefault(ex.input, ex)
        if len(seen) == n:
            return list(seen.values())
    raise InvalidParameterError(f"task {task!r} has only ~{len(seen)} distinct examples, asked for {n}")


def _pseudo_word(rng: random.Random) -> str:
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))


def rule_classification(n: int, seed: int) -> Task:
    rng = random.Random(seed)
    cats = sorted(_CATEGORIES)
    rng.shuffle(cats)
    rule = {c: ("sun" if i % 2 == 0 else "moon") for i, c in enumerate(cats)}

    def make() -> Example:
        cat = rng.choice(cats)
        text = f"The {rng.choice(_ADJECTIVES)} {rng.choice(_CATEGORIES[cat])} is near {rng.choice(_PLACES)}."
        return Example(text, rule[cat], label=rule[cat])

    examples = unique_examples(make, n, "rule_classification")
    return Task(
        "rule_classification", "Label each sentence with sun or moon.", examples, 4, meta={"rule": rule}
    )


def cipher(n: int, seed: int) -> Task:
    rng = random.Random(seed)
    shift = rng.randint(1, 25)

    def enc(word: str) -> str:
        return "".join(chr((ord(c) - 97 + shift) % 26 + 97) for c in word)

    def make() -> Example:
        word = rng.choice(_WORDS) if rng.random() < 0.5 else _pseudo_word(rng)
        return Example(word, enc(word), label=word[0])

    examples = unique_examples(make, n, "cipher")
    return Task("cipher", "Encode each word.", examples, 12, meta={"shift": shift})


def date_format(n: int, seed: int) -> Task:
    rng = random.Random(seed)
    sep = rng.choice([".", "/", "-"])
    order = rng.choice(["dmy", "ymd", "mdy"])

    def make() -> Example:
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        parts = {"d": f"{d:02d}", "m": f"{m:02d}", "y": str(y)}
        return Example(f"{_MONTHS[m - 1]} {d}, {y}", sep.join(parts[k] for k in order), label=order)

    examples = unique_examples(make, n, "date_format")
    return Task("date_format", "Rewrite each date.", examples, 12, meta={"order": order, "sep": sep})


def arithmetic(n: int, seed: int) -> Task:
    rng = random.Random(seed)
    a, b = rng.randint(2, 9), rng.randint(1, 20)

    def make() -> Example:
        x = rng.randint(0, 999)
        return Example(f"{x} widgets", f"{a * x + b} gadgets", label=str(x % 2))

    examples = unique_examples(make, n, "arithmetic")
    return Task("arithmetic", "Convert widgets to gadgets.", examples, 8, meta={"a": a, "b": b})


_CALLS: list[tuple[str, str, Callable[[random.Random], dict]]] = [
    (
        "book_table",
        "Please book a table for {people} at {restaurant} on {day}.",
        lambda r: {
            "people": r.randint(1, 12),
            "restaurant": r.choice(
                ["Luigi", "Sakura", "Le Coq", "Taj", "Nordic", "Casa Rosa", "Blue Fin", "Olive"]
            ),
            "day": r.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]),
        },
    ),
    (
        "set_alarm",
        "Wake me up at {hour}:{minute:02d} tomorrow.",
        lambda r: {"hour": r.randint(5, 11), "minute": r.choice([0, 10, 15, 20, 30, 40, 45, 50])},
    ),
    (
        "get_weather",
        "What is the weather in {city} on {day}?",
        lambda r: {
            "city": r.choice(["Oslo", "Lima", "Cairo", "Perth", "Quito", "Hanoi", "Dakar", "Riga", "Porto"]),
            "day": r.choice(["Monday", "Friday", "Sunday"]),
        },
    ),
    (
        "send_message",
        "Tell {to} that {text}.",
        lambda r: {
            "to": r.choice(["Ana", "Bo", "Chen", "Dara"]),
            "text": r.choice(["I am late", "the door is open", "dinner is ready"]),
        },
    ),
]


def function_call(n: int, seed: int) -> Task:
    rng = random.Random(seed)

    def make() -> Example:
        name, template, arguments = rng.choice(_CALLS)
        args = arguments(rng)
        return Example(template.format(**args), json.dumps({"name": name, "arguments": args}), label=name)

    examples = unique_examples(make, n, "function_call")
    return Task("function_call", "Turn each request into a function call.", examples, 48, json_output=True)
