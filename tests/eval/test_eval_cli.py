"""`longserve eval` / `eval-report`: argument parsing, target specs, end to end on a tiny model."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from longserve.errors import ContextLengthError, InvalidParameterError
from longserve.eval import cli, specs
from longserve.eval.cli import (
    RULER,
    PolicySpec,
    check_fits,
    main,
    parse_lengths,
    parse_spec,
    parse_tasks,
    register_spec_parser,
    target_specs,
)
from longserve.eval.sample import Sample
from longserve.llm import LLM

try:
    from tests.tiny import tiny_loaded
except ModuleNotFoundError:  # tests/eval has no __init__.py: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.tiny import tiny_loaded


@pytest.fixture(scope="module")
def llm():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded, _ = tiny_loaded("llama")  # ByteTokenizer (no chat template), 2048-token window
    yield LLM(loaded=loaded, progress=False)
    torch.set_num_threads(old)


@dataclass
class FakeSpec:
    """A non-policy target spec, the way later features (e.g. speculative prefill) plug in."""

    label: str
    make: type

    def build(self, llm):
        return self.make(self.label, kv=1)


@pytest.fixture
def fake_specs(monkeypatch, fake_target):
    monkeypatch.setattr(specs, "SPEC_PARSERS", [])
    register_spec_parser(lambda s: FakeSpec(s, fake_target) if s.startswith("fake") else None)


# --------------------------------------------------------------------------- parsing


def test_policy_specs_and_cross_product():
    specs = target_specs(["streaming@1k:window=64:exact=true", "snapkv@0.25"], "full,snapkv", "128,2k")
    assert [s.label for s in specs] == [
        "streaming@1024:exact=True:window=64",
        "snapkv@r0.25",
        "full",
        "snapkv@128",
        "snapkv@2048",
    ]
    assert specs[0] == PolicySpec("streaming", 1024, None, {"window": 64, "exact": True}, specs[0].label)
    assert specs[1].kv_ratio == 0.25 and specs[1].kv_budget is None
    assert [s.label for s in target_specs()] == ["full"]
    assert [s.label for s in target_specs(policies="full,sage")] == ["full", "sage"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((["nope@256"],), "unknown kv policy 'nope'"),
        ((["snapkv@abc"],), "bad budget"),
        ((["snapkv@1.5"],), "positive integer"),
        ((["snapkv@256:window"],), "KEY=VALUE"),
        ((["full", "full"],), "repeated: full"),
        (([], None, "128"), "--budgets needs --policies"),
    ],
)
def test_bad_specs(args, match):
    with pytest.raises(InvalidParameterError, match=match):
        target_specs(*args)


def test_spec_parsers_are_pluggable(fake_specs):
    assert isinstance(parse_spec("fake:draft=x"), FakeSpec)
    assert isinstance(parse_spec("snapkv@64"), PolicySpec)


def test_tasks_and_lengths():
    assert parse_tasks("ruler") == list(RULER)
    assert parse_tasks("vt,ruler,passkey")[:2] == ["vt", "niah_single_1"]
    assert "code_debug" in parse_tasks("all") and len(parse_tasks("all,vt")) == len(parse_tasks("all"))
    with pytest.raises(InvalidParameterError, match="unknown task.*nope.*known: ruler, natural, all"):
        parse_tasks("vt,nope")
    assert parse_lengths("1024, 4k") == [1024, 4096]
    with pytest.raises(InvalidParameterError, match="--lengths"):
        parse_lengths("1k2")


def test_check_fits_counts_template_and_answer():
    s = Sample("t/1", "t", "x " * 10, "?", ["a"], max_new_tokens=10, actual_tokens=100)
    check_fits([s], len, window=120, overhead=10)
    with pytest.raises(ContextLengthError, match=r"sample t/1 needs 100 prompt \+ 10 template \+ 10 answer"):
        check_fits([s], len, window=119, overhead=10)


# --------------------------------------------------------------------------- commands


def test_eval_end_to_end_on_tiny_model(tmp_path, llm, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--tasks", "niah_single_1", "--lengths", "300", "--samples", "2", "--policy", "full",
            "--policy", "snapkv@32", "--answer-cap", "2", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv, llm=llm) == 0
    printed = capsys.readouterr().out
    assert "[query_aware]" in printed and "snapkv@32" in printed and "report:" in printed
    for name in ("predictions.jsonl", "summary.json", "summary.csv", "report.md", "run_config.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "latency_memory.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["target"] for r in records} == {"full", "snapkv@32"}
    assert all(1 <= r["extra"]["completion_tokens"] <= 2 for r in records)  # niah allows 128, capped at 2
    kv = {r["target"]: r["kv_bytes"] for r in records}
    assert 0 < kv["snapkv@32"] < kv["full"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["targets"] == ["full", "snapkv@32"]
    config = json.loads((out / "run_config.json").read_text())
    assert config["model"] == "tiny-llama" and config["context_window"] == 2048
    assert config["runs"][0]["argv"] == argv and config["synthetic"]["300"]["samples"] == 2

    # resuming is refused where it would mix differently generated samples or another model's answers
    assert main([*argv[:6], "3", *argv[7:]], llm=llm) == 2
    assert "300-token samples made with other options (samples 2 -> 3)" in capsys.readouterr().err
    assert main([*argv, "--lengths", "400", "--no-plots"], llm=llm) == 0  # a new length may join
    assert [len(json.loads((out / "run_config.json").read_text())["runs"])] == [2]
    assert main(argv, llm=llm) == 0  # nothing left to do
    capsys.readouterr()

    (out / "report.md").unlink()
    assert main(["eval-report", str(out), "--no-plots"]) == 0
    assert (out / "report.md").exists()
    assert main(["eval-report", str(tmp_path)]) == 2
    assert "no predictions.jsonl" in capsys.readouterr().err


def test_errors_are_one_line_messages(tmp_path, llm, capsys):
    run = ["--out", str(tmp_path / "x"), "--quiet"]
    assert main(["eval", "--tasks", "niah_single_1,nope", *run], llm=llm) == 2
    assert "error: unknown task(s) nope" in capsys.readouterr().err
    assert main(["eval", "--tasks", "vt", "--lengths", "1024,4096", *run], llm=llm) == 2
    assert "error: target length 4096 exceeds the model's context window of 2048" in capsys.readouterr().err
    assert (
        main(["eval", "--tasks", "passkey", "--lengths", "2040", "--max-new-tokens", "200", *run], llm=llm)
        == 2
    )
    assert "more than the model's context window of 2048" in capsys.readouterr().err
    assert main(["eval", "--policy", "magic@5", *run], llm=llm) == 2
    assert "unknown kv policy 'magic'" in capsys.readouterr().err
    assert main(["eval", "--endpoint", "http://localhost:1", "--policy", "snapkv@64", *run]) == 2
    assert "do not apply to --endpoint" in capsys.readouterr().err
    assert not (tmp_path / "x" / "predictions.jsonl").exists()
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "run_config.json").write_text(json.dumps({"model": "other-model"}))
    assert main(["eval", "--tasks", "vt", "--lengths", "300", "--out", str(tmp_path / "y")], llm=llm) == 2
    assert "holds predictions of other-model, not tiny-llama" in capsys.readouterr().err


def test_custom_dataset_with_plugged_targets(tmp_path, llm, fake_specs):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "doc": f"doc {i} " * 5, "q": f"q{i}?", "a": "x"})
                              for i in range(3)) + "\n")  # fmt: skip
    templates = tmp_path / "t.json"
    templates.write_text(
        json.dumps({"mine": {"prompt": "{{ doc }}", "question": "{{ q }}", "target": "{{ a }}"}})
    )
    out = tmp_path / "run"
    argv = ["eval", "--custom", str(data), "--templates", str(templates), "--limit", "2", "--policy", "fake-a",
            "--policy", "fake-b", "--setting", "both", "--no-plots", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv, llm=llm) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2
    assert {(r["task"], r["target"], r["setting"]) for r in records} >= {("mine", "fake-a", "query_agnostic")}
    assert not list(out.glob("*.png"))


def test_registered_in_the_main_cli(capsys):
    from longserve.cli import build_parser
    from longserve.cli import main as longserve_main

    args = build_parser().parse_args(
        ["eval", "--policies", "full,snapkv", "--budgets", "64", "--setting", "both"]
    )
    assert args.func is cli.cmd_eval and args.setting == "both"
    assert build_parser().parse_args(["eval-report", "d"]).func is cli.cmd_eval_report
    assert longserve_main(["eval", "--tasks", "nope"]) == 2  # fails before any model is loaded
    assert "error: unknown task(s) nope" in capsys.readouterr().err
