"""A `longserve eval` run killed with SIGKILL midway loses nothing it finished: the rerun (resume is the
default) asks only for the missing samples, keeps every finished record as it was, and duplicates none.

The run is the real command (`longserve.eval.cli.main`) on the tiny random model in a subprocess, with
answers hanging after the third, so the parent kills it with three predictions on disk and a fourth
computed but not yet written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import sys, time
import torch
torch.set_num_threads(1)
from longserve.eval import cli
from longserve.eval.local import LocalTarget
from longserve.llm import LLM
from tests.tiny import tiny_loaded

hang_after, argv = int(sys.argv[1]), sys.argv[2:]
answered = []
real = LocalTarget.answer

def answer(self, requests):  # a slow step: the answers after the first `hang_after` never return
    out = real(self, requests)
    answered.extend(requests)
    if len(answered) > hang_after:
        time.sleep(600)
    return out

LocalTarget.answer = answer
code = cli.main(argv, llm=LLM(loaded=tiny_loaded("llama")[0], progress=False))
print(f"ANSWERED {len(answered)}")
sys.exit(code)
"""

N_RECORDS = 8  # 4 samples x 2 targets


def _eval(out: Path, hang_after: int) -> subprocess.Popen:
    argv = ["eval", "--tasks", "niah_single_1", "--lengths", "300", "--samples", "4", "--policy", "full",
            "--policy", "snapkv@32", "--answer-cap", "2", "--batch-size", "1", "--out", str(out),
            "--quiet", "--no-plots"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(hang_after), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _complete_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return text.split("\n")[:-1]  # what follows the last newline is a torn (unfinished) record


def test_a_killed_eval_resumes_without_losing_or_duplicating_samples(tmp_path):
    out = tmp_path / "run"
    predictions = out / "predictions.jsonl"
    proc = _eval(out, hang_after=3)
    try:
        deadline = time.monotonic() + 300
        while len(_complete_lines(predictions)) < 3:
            assert proc.poll() is None, f"the eval ended before being killed: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "no prediction was written in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    finished = _complete_lines(predictions)
    assert len(finished) == 3  # killed midway, with finished samples on disk

    rerun = _eval(out, hang_after=N_RECORDS)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-2000:]
    assert f"ANSWERED {N_RECORDS - len(finished)}" in stdout  # only the missing ones were asked again

    lines = _complete_lines(predictions)
    assert lines[: len(finished)] == finished  # every finished record kept, byte for byte
    records = [json.loads(line) for line in lines]
    keys = [(r["sample_id"], r["target"], r["setting"]) for r in records]
    assert len(keys) == len(set(keys)) == N_RECORDS  # nothing lost, nothing duplicated
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_predictions"] == N_RECORDS
