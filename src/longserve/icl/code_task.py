"""A code task with execution feedback: write `solve(...)` from a one-line spec; the checker runs the
answer against tests in a fresh Python subprocess with a timeout, as ACE's code agents are graded.

The house rule a model cannot guess and learns only from demonstrations or feedback: an empty input
(`[]` or `""`) returns None. The feedback names the first failing call, so a reflector can state it.
Model-written code runs in `python -I` (isolated mode) in a temporary directory with a time limit;
that bounds mistakes, it is not a sandbox against hostile code.
"""

from __future__ import annotations

import json
import random
import re
import string
import subprocess
import sys
import tempfile
from collections.abc import Callable

from longserve.icl.tasks import Example, Task, unique_examples

TIMEOUT_S = 5.0

#: (spec, argument name, body) with `{k}`-style parameters drawn per example; the body is the return
#: expression of the reference solution, after the house rule's guard.
_SPECS: list[tuple[str, str, str, Callable[[random.Random], dict]]] = [
    ("the sum of the numbers in xs greater than {k}", "xs", "sum(x for x in xs if x > {k})", lambda r: {"k": r.randint(0, 20)}),
    ("xs with every element multiplied by {k}", "xs", "[x * {k} for x in xs]", lambda r: {"k": r.randint(2, 12)}),
    ("how many times {c!r} occurs in s", "s", "s.count({c!r})", lambda r: {"c": r.choice(string.ascii_lowercase)}),
    ("s reversed and upper-cased", "s", "s[::-1].upper()", lambda r: {}),
    ("the largest element of xs minus the smallest", "xs", "max(xs) - min(xs)", lambda r: {}),
    ("s with every {c!r} replaced by {d!r}", "s", "s.replace({c!r}, {d!r})", lambda r: dict(zip("cd", r.sample(string.ascii_lowercase, 2), strict=True))),
    ("the first {k} characters of s", "s", "s[:{k}]", lambda r: {"k": r.randint(1, 9)}),
    ("the elements of xs at even indexes", "xs", "xs[::2]", lambda r: {}),
    ("the product of the numbers in xs modulo {k}", "xs", "__import__('math').prod(xs) % {k}", lambda r: {"k": r.randint(3, 30)}),
    ("the words of s sorted by length, then alphabetically", "s", "sorted(s.split(), key=lambda w: (len(w), w))", lambda r: {}),
    ("xs without duplicates, in first-seen order", "xs", "list(dict.fromkeys(xs))", lambda r: {}),
    ("the number of elements of xs divisible by {k}", "xs", "sum(1 for x in xs if x % {k} == 0)", lambda r: {"k": r.randint(2, 9)}),
]  # fmt: skip

_HARNESS = """
import json, sys
for args, want in json.loads(sys.argv[1]):
    try:
        got = solve(*args)
    except Exception as exc:
        print(json.dumps({"args": args, "error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
    if got != want:
        print(json.dumps({"args": args, "got": repr(got), "want": repr(want)}))
        sys.exit(1)
print("ok")
"""


def _inputs(rng: random.Random, arg: str) -> list:
    """Four ordinary inputs and the empty one the house rule is about."""
    if arg == "xs":
        cases = [[rng.randint(-9, 30) for _ in range(rng.randint(1, 7))] for _ in range(4)]
        return [*cases, []]
    words = ["".join(rng.choices("abcdeilmnorst", k=rng.randint(2, 7))) for _ in range(12)]
    return [" ".join(rng.sample(words, rng.randint(1, 4))) for _ in range(4)] + [""]


def reference(spec_index: int, params: dict) -> str:
    _, arg, body, _ = _SPECS[spec_index]
    return f"def solve({arg}):\n    if not {arg}:\n        return None\n    return {body.format(**params)}\n"


def extract_code(answer: str) -> str:
    """The code of an answer: the first fenced (or unfenced) piece that defines `solve`, from the first
    line that starts code (`def`, `import`, `from`), so prose around the code is not run."""
    pieces = [re.sub(r"^(python|py)\n", "", piece) for piece in answer.split("```")]
    code = next((piece for piece in pieces if "def solve" in piece), answer)
    start = re.search(r"^[ \t]*(def |import |from )", code, flags=re.M)
    return code[start.start(1) :] if start else code


def run_tests(code: str, cases: list) -> tuple[bool, str]:
    """Run `code` + the harness in a fresh interpreter: (passed, feedback naming the first failure)."""
    program = code + "\n" + _HARNESS
    with tempfile.TemporaryDirectory() as cwd:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", program, json.dumps(cases)],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                cwd=cwd,
            )
        except subprocess.TimeoutExpired:
            return False, f"the code did not finish within {TIMEOUT_S:.0f} s"
    if done.returncode == 0 and done.stdout.strip().endswith("ok"):
        return True, "correct"
    lines = done.stdout.strip().splitlines()
    try:
        failure = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        failure = None
    if failure is None:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"the code does not run: {error}"
    call = "solve(" + ", ".join(repr(a) for a in failure["args"]) + ")"
    if "error" in failure:
        return False, f"{call} raised {failure['error']}"
    return False, f"{call} returned {failure['got']}, expected {failure['want']}"


class CodeTask(Task):
    """Correct = every test passes; the tests of each example are kept by its input."""

    def check(self, prediction: str, example: Example) -> tuple[bool, str]:
        return run_tests(extract_code(prediction), self.meta["tests"][example.input])


def python_function(n: int, seed: int) -> CodeTask:
    rng = random.Random(seed)
    tests: dict[str, list] = {}

    def make() -> Example:
        index = rng.randrange(len(_SPECS))
        spec, arg, _, draw = _SPECS[index]
        params = draw(rng)
        source = reference(index, params)
        prompt = f"Write a Python function `solve({arg})` that returns {spec.format(**params)}."
        namespace: dict = {}
        exec(source, namespace)  # our own reference code: the expected values come from it
        if prompt not in tests:
            tests[prompt] = [[[x], namespace["solve"](x)] for x in _inputs(rng, arg)]
        return Example(prompt, source, label=f"spec{index}")

    examples = unique_examples(make, n, "python_function")
    instruction = "Write the Python function asked for. Answer with the code only."
    return CodeTask("python_function", instruction, examples, 96, meta={"tests": tests}, stop=("\nInput:",))
