"""Full-cache baselines of zoo models on the synthetic suite: what each model can and cannot do.

Each plan entry `MODEL:LENGTHS:SAMPLES` runs `longserve eval --model MODEL --lengths LENGTHS --samples
SAMPLES --tasks TASKS --policy full` into `OUT/MODEL/` (resumable: rerunning continues where it stopped).
An entry `MODEL:LENGTHS:SAMPLES:TASK+TASK` runs those tasks instead, into `OUT/MODEL/TASK_TASK/`, and in
the merged report they replace the same tasks of the model's main run (e.g. a rerun at a longer answer
length). Afterwards every run under `OUT` is merged into one report in `OUT/` with the model name as the
target label, and `OUT/capabilities.md` gets a task x model/length table, a verdict per model and task
(meaningful or not) and a latency/KV table.

    nice -n 5 .venv/bin/python bench/eval_baselines.py                       # the full plan (hours on CPU)
    nice -n 5 .venv/bin/python bench/eval_baselines.py --plan smollm2-135m-instruct:1024,2048:5 \\
        --plan qwen2.5-coder-0.5b-instruct:1024:3:code_debug --threads 1 --dtype bfloat16
    # the committed run: bench/results/eval_baselines.md lists its commands
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from longserve.eval.cli import main as eval_main
from longserve.eval.report import PREDICTIONS, load_predictions, write_reports

FULL_PLAN = [
    "smollm2-135m-instruct:1024,2048,4096:20",
    "qwen2.5-coder-0.5b-instruct:1024,2048,4096,8192:20",
    "qwen2.5-coder-1.5b-instruct:1024,2048,4096,8192:20",
]
TASKS = "niah_single_1,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe,passkey"
MEANINGFUL = 20.0  # a task is "meaningful" for a model if its full-cache score reaches this somewhere
MEANINGFUL_BY_TASK = {"code_debug": 50.0}  # 4-way multiple choice: chance is 25


def run_plan(entry: str, args: argparse.Namespace, out: Path) -> dict:
    model, lengths, samples, *own = entry.split(":")
    tasks = own[0].replace("+", ",") if own else args.tasks
    run_dir = out / model / own[0].replace("+", "_") if own else out / model
    argv = ["eval", "--model", model, "--lengths", lengths, "--samples", samples, "--tasks", tasks,
            "--policy", "full", "--setting", "query_aware", "--out", str(run_dir),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed)]  # fmt: skip
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.answer_cap:
        argv += ["--answer-cap", str(args.answer_cap)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    print(f"== {model} lengths={lengths} samples={samples} tasks={tasks}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    rc = eval_main(argv)
    if rc:
        raise SystemExit(rc)
    return {"model": model, "lengths": lengths, "samples": int(samples), "tasks": tasks,
            "wall_s": time.perf_counter() - started, "argv": ["longserve", *argv]}  # fmt: skip


def run_key(run: dict) -> str:
    return f"{run['model']}:{run['lengths']}:{run.get('tasks', TASKS)}"


def load_runs(path: Path) -> dict[str, dict]:
    """Finished plan entries by "MODEL:LENGTHS:TASKS" (the latest run of each)."""
    runs = json.loads(path.read_text()) if path.exists() else []
    return {run_key(r): r for r in runs}


def record_run(path: Path, run: dict) -> None:
    """Add `run` to `path`, re-reading it first: two plans may run side by side into the same --out."""
    runs = load_runs(path)
    runs[run_key(run)] = run
    path.write_text(json.dumps(list(runs.values()), indent=2) + "\n", encoding="utf-8")


def merge(out: Path) -> list[dict]:
    """All predictions under `out` in one report, labelled by model. A task run on its own
    (OUT/MODEL/TASKS/, e.g. again at a longer answer length) replaces that task of the model's main run
    (OUT/MODEL/), whose predictions stay on disk."""
    runs: dict[tuple[str, bool], list[dict]] = defaultdict(list)
    for path in out.glob(f"*/**/{PREDICTIONS}"):
        model = path.relative_to(out).parts[0]
        runs[model, path.parent != out / model] += load_predictions(path)
    records = []
    for (model, own_tasks), preds in sorted(runs.items()):
        replaced = set() if own_tasks else {r["task"] for r in runs.get((model, True), [])}
        records += [
            {**r, "target": model, "policy": model, "budget": None}
            for r in preds
            if r["task"] not in replaced
        ]
    write_reports(out, records)
    return records


def capabilities(records: list[dict]) -> str:
    """Score per task and length for every model (a pivot, then one row per model and task with its
    verdict: meaningful = the full cache reaches the task's threshold at some length)."""
    scores: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        scores[r["target"], r["task"]][int(r["length"])].append(100 * r["score"])
    models = sorted({m for m, _ in scores})
    tasks = sorted({t for _, t in scores})
    columns = [
        (m, ln) for m in models for ln in sorted({ln for (mm, _), v in scores.items() if mm == m for ln in v})
    ]

    def cell(model: str, task: str, length: int) -> str:
        values = scores.get((model, task), {}).get(length)
        return f"{sum(values) / len(values):.0f} ({len(values)})" if values else "-"

    lines = [
        "Full-cache score (x100, n in brackets) per model and prompt length (tokens).",
        "",
        "| task | " + " | ".join(f"{m} {ln // 1024}k" for m, ln in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    lines += [f"| {task} | " + " | ".join(cell(m, task, ln) for m, ln in columns) + " |" for task in tasks]
    thresholds = ", ".join(f"{t} {v:g}" for t, v in MEANINGFUL_BY_TASK.items())
    lines += [
        "",
        f"**meaningful** = the full cache reaches {MEANINGFUL:g} at some length ({thresholds}).",
        "",
        "| model | task | scores by length | meaningful |",
        "|---|---|---|---|",
    ]
    for model in models:
        for task in tasks:
            by_length = scores.get((model, task))
            if not by_length:
                continue
            means = {ln: sum(v) / len(v) for ln, v in by_length.items()}
            cells = ", ".join(f"{ln}: {means[ln]:.0f} (n={len(by_length[ln])})" for ln in sorted(means))
            ok = max(means.values()) >= MEANINGFUL_BY_TASK.get(task, MEANINGFUL)
            lines.append(f"| {model} | {task} | {cells} | {'**yes**' if ok else 'no'} |")
    return "\n".join(lines + ["", *latency_table(records)]) + "\n"


def latency_table(records: list[dict]) -> list[str]:
    """Mean TTFT, decode speed and peak KV per model and prompt length (all tasks together)."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        groups[r["target"], int(r["length"])].append(r)
    lines = [
        "| model | length | n | prompt tokens | TTFT (s) | decode tok/s | peak KV (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, length), rs in sorted(groups.items()):
        tokens, ttft, speed, kv = (
            sum(r[k] or 0 for r in rs) / len(rs)
            for k in ("prompt_tokens", "ttft_s", "decode_tok_s", "kv_bytes")
        )
        lines.append(
            f"| {model} | {length} | {len(rs)} | {tokens:.0f} | {ttft:.1f} | {speed:.1f} | {kv / 2**20:.1f} |"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--plan",
        action="append",
        help="MODEL:LENGTHS:SAMPLES[:TASK+TASK] (repeatable; default: the full plan)",
    )
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--out", default="bench/results/eval_baselines")
    p.add_argument("--threads", type=int, help="torch threads (1 is fastest on a busy shared CPU)")
    p.add_argument("--batch-size", type=int, default=1, help="1 keeps TTFT free of queueing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--answer-cap", type=int, help="at most N new tokens per answer (saves decode time on CPU)"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="weights' dtype (bfloat16 prefills 2.5-3.5x faster on CPUs with AVX512-BF16)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="only merge what the runs under --out have so far"
    )
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = args.plan or FULL_PLAN
    runs_path = out / "runs.json"
    for entry in plan:
        if not args.report_only:
            run = run_plan(entry, args, out)
            record_run(runs_path, run)
    runs = load_runs(runs_path)
    records = merge(out)
    table = capabilities(records)
    (out / "capabilities.md").write_text(table, encoding="utf-8")
    print(table)
    for r in runs.values():
        print(
            f"{r['model']} {r['lengths']} {r.get('tasks', TASKS)}: {r['wall_s'] / 60:.1f} min",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
