"""The python_function task: references pass their tests, the checker's feedback names the failure."""

import pytest

from longserve.icl import code_task, make_task
from longserve.icl.code_task import extract_code, run_tests


@pytest.fixture(scope="module")
def task():
    return make_task("python_function", 40, seed=0)


def test_every_reference_passes_its_own_tests(task):
    for ex in task.examples[:12]:
        assert task.check(ex.target, ex) == (True, "correct")


def test_forgetting_the_house_rule_is_named_in_the_feedback(task):
    ex = next(e for e in task.examples if "sum of the numbers" in e.input)
    no_guard = "\n".join(
        line for line in ex.target.splitlines() if "not xs" not in line and "None" not in line
    )
    ok, feedback = task.check(f"Here you go:\n```python\n{no_guard}\n```", ex)
    assert not ok and feedback == "solve([]) returned 0, expected None"


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("def solve(xs):\n    return 1 / 0\n", "raised ZeroDivisionError"),
        ("def solve(xs) return\n", "does not run: SyntaxError"),
        ("I cannot write code.", "does not run: SyntaxError"),
    ],
)
def test_broken_answers_get_feedback_not_a_crash(task, answer, expected):
    ex = next(e for e in task.examples if "(xs)" in e.input)
    ok, feedback = task.check(answer, ex)
    assert not ok and expected in feedback


def test_a_hanging_answer_times_out(monkeypatch):
    monkeypatch.setattr(code_task, "TIMEOUT_S", 0.5)
    ok, feedback = run_tests("def solve(xs):\n    while True:\n        pass\n", [[[[1]], 1]])
    assert not ok and "did not finish" in feedback


def test_extract_code_takes_the_first_piece_that_defines_solve():
    answer = "Sure.\n```python\nimport math\ndef solve(s):\n    return s\n```\nDone."
    assert extract_code(answer) == "import math\ndef solve(s):\n    return s\n"
    assert extract_code("Here:\ndef solve(s):\n    return s") == "def solve(s):\n    return s"
    # what a small model writes: the code, a stray fence, then a second, cut-off attempt
    rambling = (
        " def solve(xs):\n    return xs\n```\n\n```python\nfrom functools import reduce\ndef solve(xs):\n  "
    )
    assert extract_code(rambling) == "def solve(xs):\n    return xs\n"
