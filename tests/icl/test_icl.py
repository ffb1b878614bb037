"""Many-shot prompting: tasks, demonstration selection and ordering, block reuse."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from longserve.errors import InvalidParameterError
from longserve.icl import GENERATED, Example, ManyShot, ShotConfig, make_task, order, select
from longserve.icl.tasks import first_json, normalize
from longserve.llm import LLM
from tests.tiny import tiny_loaded


def pool(n: int = 12) -> list[Example]:
    return [Example(f"item {i}", str(i), label="even" if i % 2 == 0 else "odd") for i in range(n)]


def embed_by_number(texts: list[str]) -> torch.Tensor:
    """Tiny embeddings: 'item i' sits at angle i/20 on the unit circle (nearby numbers are similar)."""
    angles = torch.tensor([int(t.split()[-1]) / 20 for t in texts], dtype=torch.float)
    return torch.stack([angles.cos(), angles.sin()], -1)


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_tasks_are_seeded_and_self_consistent(name):
    a, b, c = make_task(name, 60, seed=1), make_task(name, 60, seed=1), make_task(name, 60, seed=2)
    assert a.examples == b.examples and a.examples != c.examples
    for ex in a.examples:
        assert a.check(ex.target, ex) == (True, "correct")  # the target passes its own checker
    wrong = a.examples[0]
    ok, feedback = a.check("nonsense", wrong)
    named = "does not run" if name == "python_function" else wrong.target.split()[0].strip('{"')
    assert not ok and named in feedback
    train, test = a.split(40, 20, seed=0)
    assert not set(train) & set(test) and len(train) == 40


def test_hidden_rule_is_what_the_labels_follow():
    task = make_task("rule_classification", 200, seed=3)
    rule = task.meta["rule"]
    assert sorted(set(rule.values())) == ["moon", "sun"]
    assert Counter(ex.target for ex in task.examples).keys() == {"moon", "sun"}
    cipher = make_task("cipher", 5, seed=3)
    shift = cipher.meta["shift"]
    assert all(chr((ord(ex.input[0]) - 97 + shift) % 26 + 97) == ex.target[0] for ex in cipher.examples)


def test_answers_are_normalized_and_json_is_parsed():
    assert normalize("  Output: Moon.\nmore text") == "moon"
    assert first_json('call: {"name": "f", "arguments": {"x": {"y": 1}}} done') == {
        "name": "f",
        "arguments": {"x": {"y": 1}},
    }
    assert first_json('{broken {"a": 1}') == {"a": 1} and first_json("no json") is None


def test_jsonl_dataset_and_its_errors(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"input": "a", "target": "b"}\n\n{"input": "c", "label": "x"}\n')
    task = make_task(str(good))
    assert [(e.input, e.target) for e in task.examples] == [("a", "b"), ("c", "x")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "c"}\n')
    with pytest.raises(InvalidParameterError, match="bad.jsonl:2"):
        make_task(str(bad))
    with pytest.raises(InvalidParameterError, match="unknown task"):
        make_task("no_such_task")


def test_selection_is_deterministic_given_a_seed():
    for how in ("random", "balanced"):
        assert select(pool(), 5, how, seed=4) == select(pool(), 5, how, seed=4)
    assert select(pool(), 5, "random", seed=4) != select(pool(), 5, "random", seed=5)


def test_balanced_balances_labels():
    skewed = pool(12) + [Example(f"item {i}", str(i), "odd") for i in range(13, 40, 2)]
    picked = select(skewed, 8, "balanced", seed=0)
    assert Counter(ex.label for ex in picked) == {"even": 4, "odd": 4}


def test_similar_returns_the_nearest_items():
    anchor = embed_by_number(["item 7"])[0]
    picked = select(pool(), 3, "similar", embed=embed_by_number, anchor=anchor)
    assert [ex.input for ex in picked] == ["item 7", "item 6", "item 8"] or {ex.input for ex in picked} == {
        "item 6",
        "item 7",
        "item 8",
    }
    assert picked[0].input == "item 7"


def test_diverse_covers_the_pool():
    picked = select(pool(), 3, "diverse", embed=embed_by_number)
    numbers = sorted(int(ex.target) for ex in picked)
    assert numbers[0] <= 1 and numbers[-1] >= 10  # both ends of the range, not three neighbours


def test_orderings():
    demos = select(pool(), 6, "random", seed=1)
    by_label = order(demos, "by-label")
    assert [ex.label for ex in by_label] == sorted(ex.label for ex in demos)
    anchor = embed_by_number(["item 11"])[0]
    last = order(demos, "similar-last", embed=embed_by_number, anchor=anchor)
    sims = (embed_by_number([ex.input for ex in last]) @ anchor).tolist()
    assert sims == sorted(sims)  # the most similar demonstration stands next to the query
    with pytest.raises(InvalidParameterError):
        order(demos, "alphabetical")


def test_bad_selection_requests_are_refused():
    with pytest.raises(InvalidParameterError, match="pool of 12"):
        select(pool(), 13)
    with pytest.raises(InvalidParameterError, match="embedding"):
        select(pool(), 3, "diverse")
    with pytest.raises(InvalidParameterError, match="unknown selection"):
        select(pool(), 3, "best")


@pytest.fixture(scope="module")
def runner():
    llm = LLM(loaded=tiny_loaded("llama")[0], prefill_chunk=64)
    return ManyShot(llm, make_task("cipher", 80, seed=0), embed=embed_words)


def embed_words(texts: list[str]) -> torch.Tensor:
    vectors = torch.tensor([[len(t), sum(map(ord, t)) % 97, t.count("e")] for t in texts], dtype=torch.float)
    return torch.nn.functional.normalize(vectors, dim=-1)


def test_reused_block_answers_equal_re_prefilled_answers(runner):
    train, test = runner.task.split(40, 4, seed=0)
    reuse = runner.run(train, test, ShotConfig(8, seed=1))
    again = runner.run(train, test, ShotConfig(8, seed=1, reuse=False))
    assert [q.prediction for q in reuse.queries] == [q.prediction for q in again.queries]
    assert reuse.block_tokens == again.block_tokens > 8 * 10
    assert reuse.block_kv_bytes > 0 and again.block_kv_bytes == 0
    # the reused block is prefilled once: each query prefills only itself
    assert all(q.prompt_tokens < 40 for q in reuse.queries)
    assert all(q.prompt_tokens > reuse.block_tokens for q in again.queries)
    summary = reuse.summary()
    assert summary["n"] == 4 and 0 <= summary["accuracy"] <= 1


def test_dynamic_selection_and_max_shots(runner):
    train, test = runner.task.split(40, 2, seed=0)
    result = runner.run(train, test, ShotConfig(4, selection="similar", dynamic=True))
    assert len(result.queries) == 2 and result.block_tokens > 0
    most = runner.max_shots(train)
    assert runner.block_tokens(train[:most]) <= runner.llm.context_window
    assert most == len(train) or runner.block_tokens(train[: most + 1]) > runner.llm.context_window - 80


class HalfRightModel:
    """An LLM stand-in that knows the cipher's answers and gets every other input wrong."""

    def __init__(self, task):
        self.answers = {ex.input: ex.target for ex in task.examples}
        self.asked: list[str] = []

    def split_chat(self, context: str, question: str):
        return [context], [question]

    def generate(self, ids, max_new_tokens: int, **sampling):
        word = ids[-1].split("Input: ")[1].split("\n")[0]
        self.asked.append(word)
        text = self.answers[word] if len(self.asked) % 2 else "wrong"

        class Out:
            pass

        out = Out()
        out.text = f" {text}\nmore"
        return [out]


def test_reinforce_keeps_only_checked_answers():
    task = make_task("cipher", 20, seed=0)
    model = HalfRightModel(task)
    unlabelled = task.examples[:6]
    kept = ManyShot(model, task, chat=True).reinforce(unlabelled, task.examples[6:8])
    assert model.asked == [ex.input for ex in unlabelled]
    assert [ex.input for ex in kept] == [ex.input for ex in unlabelled[::2]]
    assert [ex.target for ex in kept] == [ex.target for ex in unlabelled[::2]]  # the model's own answer
