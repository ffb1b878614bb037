import json

import pytest

from longserve.errors import InvalidParameterError
from longserve.eval.longbench import (
    DatasetFormatError,
    PromptTemplate,
    load_custom,
    load_longbench,
    load_templates,
    truncate_middle,
)
from longserve.eval.runner import score_sample


def _line(dataset, i, **kw):
    ex = {"input": f"question {i}?", "context": f"passage {i} " * 20, "answers": [f"answer {i}"],
          "all_classes": None, "length": 40, "dataset": dataset, "_id": f"id{i}"}  # fmt: skip
    ex.update(kw)
    return json.dumps(ex)


@pytest.fixture
def bench_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        _line("hotpotqa", 1),
        _line("trec", 2, answers=["Location"], all_classes=["Location", "Human"], length=5000),
        "{not json",
        "",
        _line("passage_count", 4, answers=["7"]),
        json.dumps({"input": "q", "context": "c", "dataset": "hotpotqa", "_id": "x"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_line_is_reported_with_its_number(bench_file):
    with pytest.raises(DatasetFormatError, match=r"mixed\.jsonl:3: invalid JSON"):
        load_longbench(bench_file)


def test_skip_mode_counts_skipped(bench_file):
    result = load_longbench(bench_file, on_error="skip")
    assert [s.id for s in result] == ["hotpotqa/id1", "trec/id2", "passage_count/id4"]
    assert len(result.skipped) == 2
    assert ":3: invalid JSON" in result.skipped[0]
    assert ":6: missing field 'answers'" in result.skipped[1]


def test_prompts_metrics_and_metadata(bench_file):
    hotpot, trec, count = load_longbench(bench_file, on_error="skip").samples
    assert hotpot.context.startswith("Answer the question based on the given passages.")
    assert "passage 1 passage 1" in hotpot.context and "question 1?" not in hotpot.context
    assert hotpot.question.endswith("Question: question 1?\nAnswer:")
    assert (hotpot.metric, hotpot.max_new_tokens) == ("qa_f1", 32)
    assert (trec.metric, trec.metadata["raw_prompt"], trec.metadata["first_line"]) == (
        "classification",
        True,
        True,
    )
    assert trec.length_label == "4-8k" and hotpot.length_label == "0-4k"
    assert score_sample(trec, "Location\nHuman") == 1.0  # first line only, classes from the file
    assert score_sample(count, "There are 7 unique paragraphs.") == 1.0
    assert score_sample(hotpot, "It is answer 1") == pytest.approx(2 / 3)


def test_unknown_dataset_and_limit(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(_line("nope", 1) + "\n" + _line("qasper", 2) + "\n" + _line("qasper", 3) + "\n")
    with pytest.raises(DatasetFormatError, match=r"x\.jsonl:1: unknown LongBench dataset 'nope'"):
        load_longbench(path)
    assert len(load_longbench(path, on_error="skip", limit=1)) == 1
    assert load_longbench(path, dataset="qasper_e", limit=1).samples[0].task == "qasper"
    with pytest.raises(InvalidParameterError):
        load_longbench(path, on_error="ignore")


def test_middle_truncation(bench_file):
    text = " ".join(str(i) for i in range(1000))
    cut = truncate_middle(text, 100, lambda t: len(t.split()))
    assert len(cut.split()) <= 100 and cut.startswith("0 1 2") and cut.endswith("998 999")
    sample = load_longbench(
        bench_file, on_error="skip", count_tokens=lambda t: len(t.split()), max_context_tokens=80
    )
    hotpot = sample.samples[0]
    assert 70 <= hotpot.actual_tokens <= 80 and "question 1?" in hotpot.question
    assert "passages.\npassage 1 " in hotpot.context and "passage 1 \n\n" in hotpot.context


def test_custom_dataset_templates(tmp_path):
    spec = {
        "qa": {
            "prompt": "Doc: {{ doc }}\n",
            "question": "Q: {{ q }}\nA:",
            "target": "{{ gold | join('|||') }}",
        },
        "ps": {"jinja": "{{ doc }} ||| {{ gold[0] }}", "metric": "string_match_part", "max_new_tokens": 8},
    }
    (tmp_path / "t.json").write_text(json.dumps(spec))
    templates = load_templates(tmp_path / "t.json")
    data = tmp_path / "d.jsonl"
    rows = [{"id": 7, "doc": "long text", "q": "what?", "gold": ["a", "b"]}, {"id": 8, "doc": "no question"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DatasetFormatError, match=r"d\.jsonl:2: template error"):
        load_custom(data, templates["qa"], task="qa")
    result = load_custom(data, templates["qa"], task="qa", on_error="skip")
    (s,) = result.samples
    assert (s.id, s.context, s.question, s.answers, s.metric) == (
        "qa/7",
        "Doc: long text\n",
        "Q: what?\nA:",
        ["a", "b"],
        "qa_f1",
    )
    assert len(result.skipped) == 1
    (p,) = load_custom(data, templates["ps"], task="ps", on_error="skip").samples
    assert (p.context, p.question, p.answers, p.max_new_tokens) == ("long text", "", ["a"], 8)
    with pytest.raises(InvalidParameterError, match="needs 'prompt' and 'target'"):
        PromptTemplate.from_dict({"prompt": "x"})
    with pytest.raises(InvalidParameterError, match="unknown metric"):
        PromptTemplate.from_dict({"prompt": "x", "target": "y", "metric": "bleu"})
