import csv
import json

import pytest

from longserve.errors import InvalidParameterError
from longserve.eval.report import load_predictions, parse_label
from longserve.eval.runner import report_from_predictions, run_eval
from longserve.eval.suite import make_suite


@pytest.fixture
def samples(count_tokens):
    return make_suite(["niah_single", "vt"], 2, [300, 600], count_tokens, seed=0)


def _targets(fake_target, samples):
    oracle = {s.prompt: " ".join(s.answers) for s in samples}
    half = {s.prompt: " ".join(s.answers) for i, s in enumerate(samples) if i % 2 == 0}
    return {
        "full": fake_target("full", oracle, kv=200),
        "snapkv@64": fake_target("snapkv@64", half, kv=20),
        "snapkv@128": fake_target("snapkv@128", oracle, kv=40),
    }


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_end_to_end_writes_everything(tmp_path, samples, fake_target):
    targets = _targets(fake_target, samples)
    summary = run_eval(
        samples, targets, tmp_path, settings=["query_aware", "query_agnostic"], progress=False, batch_size=3
    )
    records = _lines(tmp_path / "predictions.jsonl")
    assert len(records) == len(samples) * 3 * 2 == summary["n_predictions"]
    assert {r.setting for r in targets["full"].seen} == {"query_aware", "query_agnostic"}
    rows = {(r["task"], r["target"], r["setting"], r["length"]): r for r in summary["rows"]}
    assert rows["vt", "full", "query_aware", "all"]["score"] == 100.0
    assert rows["vt", "full", "query_aware", "all"]["n"] == 4
    assert rows["niah_single", "snapkv@64", "query_agnostic", "300"]["n"] == 2
    assert rows["vt", "snapkv@64", "query_aware", "all"]["budget"] == 64
    assert (
        0
        < rows["vt", "snapkv@64", "query_aware", "all"]["kv_bytes_peak"]
        < rows["vt", "full", "query_aware", "all"]["kv_bytes_peak"]
    )
    with (tmp_path / "summary.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(summary["rows"])
    report = (tmp_path / "report.md").read_text()
    assert "## Scores, setting `query_aware`" in report and "| task | length | full |" in report
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "latency_memory.png" in pngs and "accuracy_vs_budget_query_aware.png" in pngs
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for p in pngs:
        assert f"]({p})" in report


def test_resume_after_crash_only_queries_missing(tmp_path, samples, fake_target):
    crashing = fake_target("full", fail_after=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(samples, {"full": crashing}, tmp_path, progress=False, batch_size=1, plots=False)
    assert len(_lines(tmp_path / "predictions.jsonl")) == 3
    healthy = fake_target("full")
    summary = run_eval(samples, {"full": healthy}, tmp_path, progress=False, batch_size=2, plots=False)
    assert len(healthy.seen) == len(samples) - 3
    done = {r.context + r.question for r in crashing.seen}
    assert not done & {r.context + r.question for r in healthy.seen}
    assert summary["n_predictions"] == len(samples) == len(_lines(tmp_path / "predictions.jsonl"))
    again = fake_target("full")
    run_eval(samples, {"full": again}, tmp_path, progress=False, plots=False)
    assert again.seen == []
    run_eval(samples[:2], {"full": again}, tmp_path, progress=False, resume=False, plots=False)
    assert len(again.seen) == 2 and len(_lines(tmp_path / "predictions.jsonl")) == 2


def test_torn_last_line_is_requeried(tmp_path, samples, fake_target):
    run_eval(samples[:2], {"full": fake_target("full")}, tmp_path, progress=False, plots=False)
    path = tmp_path / "predictions.jsonl"
    path.write_text(path.read_text() + '{"sample_id": "niah_single/300/1", "tar')
    target = fake_target("full")
    run_eval(samples[:3], {"full": target}, tmp_path, progress=False, plots=False)
    assert len(target.seen) == 1
    assert len(load_predictions(path)) == 3


def test_report_from_predictions_regenerates(tmp_path, samples, fake_target):
    run_eval(samples, _targets(fake_target, samples), tmp_path, progress=False)
    for name in ("summary.json", "summary.csv", "report.md"):
        (tmp_path / name).unlink()
    summary = report_from_predictions(tmp_path)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "report.md").exists() and (tmp_path / "summary.csv").exists()


def test_validation(tmp_path, samples, fake_target):
    with pytest.raises(InvalidParameterError, match="unknown setting"):
        run_eval(samples, {"full": fake_target("full")}, tmp_path, settings="sometimes", progress=False)
    with pytest.raises(InvalidParameterError, match="unique"):
        run_eval(samples + samples[:1], {"full": fake_target("full")}, tmp_path, progress=False)
    with pytest.raises(InvalidParameterError, match="no targets"):
        run_eval(samples, {}, tmp_path, progress=False)


def test_parse_label():
    assert parse_label("snapkv@256") == ("snapkv", 256)
    assert parse_label("h2o@2k") == ("h2o", 2048)
    assert parse_label("pyramid@0.5") == ("pyramid", 0.5)
    assert parse_label("full") == ("full", None)
    assert parse_label("my model") == ("my model", None)
