"""Run samples against one or more targets, crash-safely, and write the reports.

Predictions are appended and flushed one sample at a time, so an interrupted run keeps everything it
finished; a rerun with `resume=True` only asks for the missing (sample, target, setting) triples.
"""

from __future__ import annotations

import json
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
from longserve.eval.target import SETTINGS, EvalRequest, EvalResult, Target

__all__ = ["run_eval", "report_from_predictions", "score_sample"]


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
