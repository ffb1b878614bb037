import re

import pytest

from longserve.errors import InvalidParameterError
from longserve.eval.metrics import string_match_all
from longserve.eval.natural import HEAD, expand_questions, load_paragraphs
from longserve.eval.suite import make_suite
from longserve.eval.tasks import NATURAL, parse_tasks


def body(sample) -> list[str]:
    return sample.context.removeprefix(HEAD).split("\n\n")


def test_pool_is_real_prose_without_repeats():
    pool = load_paragraphs()
    assert len(pool) > 500 and len(set(pool)) == len(pool)
    assert sum(map(len, pool)) > 100_000  # room for 8k-token haystacks with different text per seed
    assert not any(re.search(r"\d{6}", p) for p in pool)


def test_same_seed_same_samples(count_tokens):
    a = make_suite(list(NATURAL), 2, 2000, count_tokens, seed=3)
    b = make_suite(list(NATURAL), 2, 2000, count_tokens, seed=3)
    c = make_suite(list(NATURAL), 2, 2000, count_tokens, seed=4)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert all(x.context != y.context for x, y in zip(a, c, strict=True))
    # different samples read different text, not one haystack with a moved needle
    assert body(a[0])[1:4] != body(a[1])[1:4]


@pytest.mark.parametrize("length", [2048, 4096, 8192])
def test_lengths_and_no_repeated_filler(count_tokens, length):
    for s in make_suite(list(NATURAL), 1, length, count_tokens, seed=1):
        assert s.actual_tokens == count_tokens(s.prompt)
        assert length - max(64, 0.05 * length) <= s.actual_tokens <= length, s.task
        units = body(s)
        assert len(units) == len(set(units)), s.task
        assert s.metadata["haystack_sha"]


def test_needles_are_unique_and_answerable(count_tokens):
    for s in make_suite(list(NATURAL), 3, 2048, count_tokens, seed=5):
        for answer in s.answers:
            assert len(re.findall(rf"\b{re.escape(answer)}\b", s.context)) == 1, (s.id, answer)
            assert answer not in s.question
        for name in s.metadata["names"]:
            assert name in s.context
        assert string_match_all(" ".join(s.answers), s.answers) == 1.0
    single = make_suite(["natural_single"], 1, 2048, count_tokens)[0]
    needle = f"The locker number for {single.metadata['names'][0]} is {single.answers[0]}."
    assert needle in body(single) and re.fullmatch(r"\d{6}", single.answers[0])
    multivalue = make_suite(["natural_multivalue"], 1, 2048, count_tokens)[0]
    assert len(multivalue.answers) == 4 and multivalue.context.count("One of the locker numbers for") == 4


def test_prose_fact_is_asked_in_other_words(count_tokens):
    for s in make_suite(["natural_prose"], 6, 2048, count_tokens, seed=2):
        assert s.metadata["fact"] in s.context
        assert "locker" not in s.context
        assert s.answers[0].lower() not in s.question.lower()


def test_multikey_expands_to_one_question_per_key(count_tokens):
    s = make_suite(["natural_multikey"], 1, 2048, count_tokens, seed=7)[0]
    assert s.context.count("The locker number for") == 4
    expanded = expand_questions([s])
    assert [e.id for e in expanded] == [f"{s.id}/q{j}" for j in range(4)]
    assert {e.context for e in expanded} == {s.context}
    answers = [e.answers[0] for e in expanded]
    assert len(set(answers)) == 4 and expanded[0].answers == s.answers
    for e, name in zip(expanded, s.metadata["names"], strict=True):
        assert name in e.question and f"The locker number for {name} is {e.answers[0]}." in s.context
    other = make_suite(["natural_single"], 2, 2048, count_tokens)
    assert expand_questions(other) == other


def test_depth_is_swept(count_tokens):
    samples = make_suite(["natural_single"], 3, 4096, count_tokens, seed=2)
    assert [s.depth for s in samples] == [0.0, 0.5, 1.0]
    for s in samples:
        units = body(s)
        index = next(i for i, u in enumerate(units) if s.answers[0] in u)
        assert abs(index / (len(units) - 1) - s.depth) < 0.02


def test_task_set_and_errors(count_tokens):
    assert parse_tasks("natural") == list(NATURAL)
    assert parse_tasks("natural_prose,natural") == [
        "natural_prose",
        *[t for t in NATURAL if t != "natural_prose"],
    ]
    with pytest.raises(InvalidParameterError, match="too small"):
        make_suite(["natural_multikey"], 1, 30, count_tokens)
    with pytest.raises(InvalidParameterError, match="could only fill"):
        make_suite(["natural_single"], 1, 200_000, count_tokens)  # more than the pool holds
