"""Run samples against one or more targets, crash-safely, and write the reports.

Predictions are appended and flushed one sample at a time, so an interrupted run keeps everything it
finished; a rerun with `resume=True` only asks for the missing (sample, target, setting) triples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from longserve.errors import InvalidParameterError, LongserveError
from longserve.eval.metrics import score
from longserve.eval.report import (
    PREDICTIONS,
    load_predictions,
    parse_label,
    record_key,
    report_from_predictions,
)
from longserve.eval.sample import Sample
from longserve.eval.suite import parse_lengths
from longserve.eval.target import SETTINGS, EvalRequest, EvalResult, Target

__all__ = ["RUN_CONFIG", "print_summary", "record_run", "report_from_predictions", "run_eval", "score_sample"]

RUN_CONFIG = "run_config.json"


def score_sample(sample: Sample, prediction: str) -> float:
    return score(
        sample.metric,
        prediction,
        sample.answers,
        all_classes=sample.metadata.get("all_classes"),
        first_line=bool(sample.metadata.get("first_line")),
    )


def _record(sample: Sample, label: str, setting: str, result: EvalResult) -> dict[str, Any]:
    policy, budget = parse_label(label)
    return {
        "sample_id": sample.id,
        "task": sample.task,
        "target": label,
        "policy": policy,
        "budget": budget,
        "setting": setting,
        "length": sample.length_label,
        "target_tokens": sample.target_tokens,
        "actual_tokens": sample.actual_tokens,
        "depth": sample.depth,
        "metric": sample.metric,
        "answers": sample.answers,
        "prediction": result.text,
        "score": score_sample(sample, result.text),
        "prompt_tokens": result.prompt_tokens,
        "ttft_s": result.ttft_s,
        "decode_tok_s": result.decode_tok_s,
        "kv_bytes": result.kv_bytes,
        "extra": result.extra,
        "metadata": {k: v for k, v in sample.metadata.items() if not k.startswith("_")},
        "time": time.time(),
    }


def _validate(samples: Sequence[Sample], targets: Mapping[str, Target], settings: list[str], batch_size: int):
    if not targets:
        raise InvalidParameterError("no targets to evaluate")
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise InvalidParameterError(f"unknown setting(s) {', '.join(bad)}; choose from {', '.join(SETTINGS)}")
    if batch_size < 1:
        raise InvalidParameterError(f"batch_size must be >= 1, got {batch_size}")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise InvalidParameterError(f"sample ids must be unique; duplicated: {', '.join(dupes)}")


def run_eval(
    samples: Sequence[Sample],
    targets: Mapping[str, Target],
    out_dir: str | Path,
    *,
    settings: str | Sequence[str] = "query_aware",
    resume: bool = True,
    progress: bool = True,
    batch_size: int = 4,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate every sample on every target (label -> target, e.g. "full", "snapkv@256") and setting.

    Writes `out_dir/predictions.jsonl`, then summary.json, summary.csv, report.md and PNG plots; returns the
    summary. `resume=False` discards earlier predictions in `out_dir`.
    """
    settings = [settings] if isinstance(settings, str) else list(settings)
    _validate(samples, targets, settings, batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PREDICTIONS
    if not resume:
        path.unlink(missing_ok=True)
    done = {record_key(r) for r in load_predictions(path)}
    jobs = [
        (label, setting, [s for s in samples if (s.id, label, setting) not in done])
        for label in targets
        for setting in settings
    ]
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with (
        path.open("a", encoding="utf-8") as f,
        tqdm(
            total=sum(len(p) for *_, p in jobs), disable=not progress, unit="sample", dynamic_ncols=True
        ) as bar,
    ):
        if torn:  # a crash cut the last line: start ours on a fresh line
            f.write("\n")
        for label, setting, pending in jobs:
            bar.set_description(f"{label} [{setting}]")
            for i in range(0, len(pending), batch_size):
                batch = pending[i : i + batch_size]
                requests = [
                    EvalRequest(
                        s.context,
                        s.question,
                        s.max_new_tokens,
                        setting,
                        raw_prompt=bool(s.metadata.get("raw_prompt")),
                    )
                    for s in batch
                ]
                results = targets[label].answer(requests)
                if len(results) != len(batch):
                    raise LongserveError(
                        f"target {label!r} returned {len(results)} results for {len(batch)} requests"
                    )
                for sample, result in zip(batch, results, strict=True):
                    f.write(json.dumps(_record(sample, label, setting, result), ensure_ascii=False) + "\n")
                    f.flush()
                bar.update(len(batch))
    return report_from_predictions(out, plots=plots)


def record_run(
    out: Path,
    args: argparse.Namespace,
    model: str,
    targets: list[str],
    settings: list[str],
    n_samples: int,
    window: int | None,
) -> None:
    """Append this run to `out/run_config.json`, refusing to resume into predictions it would corrupt.

    Resuming skips samples by id (`task/length/i`), but a sample's content also depends on the model, the
    seed, `--samples` (single-needle depths are spread over them) and the answer length: a rerun that
    changes any of them for a length already in `out` must use another `--out` or `--no-resume`.
    """
    path = out / RUN_CONFIG
    old = json.loads(path.read_text("utf-8")) if path.exists() and not args.no_resume else {}
    hint = "use another --out, or --no-resume to discard the earlier predictions"
    if old.get("model", model) != model:
        raise InvalidParameterError(f"{out} holds predictions of {old['model']}, not {model}; {hint}")
    synthetic = dict(old.get("synthetic", {}))
    if args.tasks or not (args.longbench or args.custom):
        suite = {
            "samples": args.samples,
            "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "answer_cap": args.answer_cap,
        }
        for length in map(str, parse_lengths(args.lengths)):
            before = synthetic.setdefault(length, suite)
            if before != suite:
                changed = ", ".join(
                    f"{k} {before.get(k)} -> {v}" for k, v in suite.items() if before.get(k) != v
                )
                raise InvalidParameterError(
                    f"{out} has {length}-token samples made with other options ({changed}); {hint}"
                )
    run = {
        "argv": getattr(args, "argv", None) or sys.argv[1:],
        "targets": targets,
        "settings": settings,
        "n_samples": n_samples,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    config = {
        "model": model,
        "context_window": window,
        "synthetic": synthetic,
        "runs": [*old.get("runs", []), run],
    }
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def print_summary(summary: dict[str, Any], out: Any = None) -> None:
    """Overall score per task (rows) and target (columns), one table per setting."""
    out = out or sys.stdout
    rows = [r for r in summary["rows"] if r["length"] == "all"]
    for setting in summary["settings"]:
        cells = {(r["task"], r["target"]): r["score"] for r in rows if r["setting"] == setting}
        targets, tasks = summary["targets"], sorted({t for t, _ in cells})
        width = max([len(t) for t in tasks] + [4])
        print(f"[{setting}]", file=out)
        print(f"{'task':{width}}  " + "  ".join(f"{t:>10}" for t in targets), file=out)
        for task in tasks:
            scores = [cells.get((task, t)) for t in targets]
            print(
                f"{task:{width}}  " + "  ".join(" " * 10 if s is None else f"{s:10.1f}" for s in scores),
                file=out,
            )
