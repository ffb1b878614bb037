import ast
import difflib
import os
import random

import pytest

from longserve.eval.code_debug import LETTERS, _Offsets, find_mutations, stdlib_root
from longserve.eval.metrics import choice_score
from longserve.eval.suite import make_code_debug


@pytest.fixture(scope="module")
def samples():
    return make_code_debug(2, 3000, lambda t: len(t.split()), seed=11)


def test_deterministic(samples):
    again = make_code_debug(2, 3000, lambda t: len(t.split()), seed=11)
    assert [s.to_dict() for s in samples] == [s.to_dict() for s in again]


def test_length_and_answer(samples):
    for s in samples:
        assert 3000 - 150 <= s.actual_tokens <= 3000
        letter, name = s.answers
        options = {o["letter"]: o for o in s.metadata["options"]}
        assert list(options) == list(LETTERS)
        assert options[letter]["name"] == name == s.metadata["bug"]["function"]
        assert f"{letter}. {name} (in {options[letter]['file']})" in s.question
        assert choice_score(letter, s.answers) == 1.0


def _changed_region(a: str, b: str) -> tuple[str, str]:
    """The differing middle of two strings once their common prefix and suffix are removed."""
    p = len(os.path.commonprefix([a, b]))
    q = len(os.path.commonprefix([a[p:][::-1], b[p:][::-1]]))
    return a[p : len(a) - q], b[p : len(b) - q]


def test_exactly_one_edit_in_the_buggy_function(samples):
    for s in samples:
        original, mutated = s.metadata["_original_function"], s.metadata["_mutated_function"]
        before, after = _changed_region(original, mutated)
        assert before != after and "\n" not in before + after and len(before + after) <= 40
        changed = [ln for ln in difflib.ndiff(original.splitlines(), mutated.splitlines()) if ln[0] in "+-"]
        assert len(changed) == 2  # one line out, one line in
        assert mutated in s.context and original not in s.context
        # The rest of the buggy file is byte-identical to the stdlib source, and the edit changes the code.
        source = (stdlib_root() / s.metadata["bug"]["file"]).read_text("utf-8")
        assert source.replace(original, mutated) in s.context
        assert ast.dump(ast.parse(source)) != ast.dump(ast.parse(source.replace(original, mutated)))


def test_other_candidates_unchanged(samples):
    for s in samples:
        for option in s.metadata["options"]:
            if option["letter"] != s.answers[0]:
                source = (stdlib_root() / option["file"]).read_text("utf-8")
                assert source in s.context
                assert s.context.count(f"def {option['name']}(") == 1


SNIPPET = """\
def f(items, limit):
    total = 0
    last = len(items) + 1
    for i in range(len(items)):
        if items[i] < limit and i != 3:
            total += items[i]
    return total
"""


def test_mutation_kinds_are_minimal_edits():
    func = ast.parse(SNIPPET).body[0]
    sites = find_mutations(func, _Offsets(SNIPPET), random.Random(0))
    kinds = {m.kind for m in sites}
    assert kinds == {"flip_comparison", "swap_and_or", "off_by_one", "wrong_return"}
    for m in sites:
        mutated = m.apply(SNIPPET)
        ast.parse(mutated)
        assert mutated != SNIPPET
        diff = [line for line in difflib.ndiff(SNIPPET.splitlines(), mutated.splitlines()) if line[0] in "+-"]
        assert len(diff) == 2  # one line out, one line in
    applied = [m.apply(SNIPPET) for m in sites]
    assert any("range(len(items) - 1)" in a for a in applied)
    assert any("last = len(items) - 1" in a for a in applied)
    assert any("items[i] < limit or i != 3" in a for a in applied)
    assert any("items[i] >= limit and" in a for a in applied)
    assert any("return total" not in a for a in applied)
