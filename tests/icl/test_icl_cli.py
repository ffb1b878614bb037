"""`longserve icl` / `longserve ace` end to end on a tiny model: reports, plots, playbook file."""

from __future__ import annotations

import argparse
import json

import pytest

from longserve.errors import InvalidParameterError
from longserve.icl import cli
from longserve.llm import LLM
from tests.tiny import tiny_loaded


@pytest.fixture
def tiny(monkeypatch):
    llm = LLM(loaded=tiny_loaded("llama")[0], prefill_chunk=128)
    monkeypatch.setattr(cli, "_llm", lambda args: llm)
    return llm


def parse(argv: list[str]):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_icl_command_writes_the_report(tiny, tmp_path):
    out = tmp_path / "icl"
    args = parse(
        [
            "icl",
            "--task",
            "arithmetic",
            "--shots",
            "0,2",
            "--selection",
            "random,diverse",
            "--n-train",
            "10",
            "--n-test",
            "2",
            "--compare-reprefill",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["shots"], r["selection"], r["reuse"]) for r in rows] == [
        (0, "random", True),
        (0, "random", False),
        (2, "random", True),
        (2, "random", False),
        (0, "diverse", True),
        (0, "diverse", False),
        (2, "diverse", True),
        (2, "diverse", False),
    ]
    assert all(r["n"] == 2 for r in rows)
    report = (out / "report.md").read_text()
    assert "| 2 | diverse | random | re-prefill | full | 2 |" in report
    assert (out / "accuracy_vs_shots.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_shots_and_selection_are_refused():
    with pytest.raises(InvalidParameterError, match="--shots"):
        cli.parse_shots("4,lots")
    assert cli.parse_shots("0, 16,max") == [0, 16, "max"]
    args = parse(["icl", "--selection", "best"])
    with pytest.raises(InvalidParameterError, match="unknown selection"):
        args.func(args)


def test_ace_command_saves_the_playbook_and_reports(tiny, tmp_path):
    out, playbook = tmp_path / "ace", tmp_path / "pb.json"
    args = parse(
        [
            "ace",
            "--task",
            "cipher",
            "--n-train",
            "1",
            "--n-test",
            "1",
            "--playbook",
            str(playbook),
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"base", "offline_adaptation", "after_offline"}
    assert json.loads(playbook.read_text())["format"] == "longserve-playbook/1"
    assert (out / "playbook_size.png").exists() and "| after_offline | 1 |" in (out / "report.md").read_text()
