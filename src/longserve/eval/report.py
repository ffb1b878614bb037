"""Turn `predictions.jsonl` into summary.json/csv, report.md and PNG plots.

Everything is recomputed from the predictions file, so a report can be regenerated (or merged from several
runs) without querying any model again.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from statistics import fmean
from typing import Any

PREDICTIONS = "predictions.jsonl"
_LABEL = re.compile(r"^(?P<policy>.+?)@(?P<budget>\d+(?:\.\d+)?)(?P<k>[kK]?)$")


def parse_label(label: str) -> tuple[str, float | None]:
    """ "snapkv@256" -> ("snapkv", 256); "h2o@2k" -> ("h2o", 2048); "full" -> ("full", None)."""
    m = _LABEL.match(label)
    if not m:
        return label, None
    budget = float(m["budget"]) * (1024 if m["k"] else 1)
    return m["policy"], int(budget) if budget.is_integer() else budget


def record_key(record: dict[str, Any]) -> tuple[str, str, str]:
    return record["sample_id"], record["target"], record["setting"]


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """All complete records (a torn last line from a crash is ignored); a re-run record replaces an older one."""
    path = Path(path)
    if not path.exists():
        return []
    records: dict[tuple[str, str, str], dict[str, Any]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                records[record_key(record)] = record
            except (ValueError, KeyError, TypeError):
                continue
    return list(records.values())


def _length_key(length: str) -> tuple[int, float, str]:
    if length == "all":
        return (2, 0.0, length)
    try:
        return (0, float(length), length)
    except ValueError:
        return (1, 0.0, length)


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return round(fmean(values), 4) if values else 0.0


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task x target x setting x length, plus `length="all"` rows per task x target x setting."""
    groups: dict[tuple[str, str, str, str], list[dict]] = defaultdict(list)
    for r in records:
        for length in (str(r["length"]), "all"):
            groups[r["task"], r["target"], r["setting"], length].append(r)
    rows = []
    for (task, target, setting, length), rs in groups.items():
        policy, budget = parse_label(target)
        rows.append(
            {
                "task": task,
                "target": target,
                "policy": policy,
                "budget": budget,
                "setting": setting,
                "length": length,
                "n": len(rs),
                "score": round(100 * fmean(r["score"] for r in rs), 2),
                "prompt_tokens": _mean(r["prompt_tokens"] for r in rs),
                "ttft_s": _mean(r["ttft_s"] for r in rs),
                "decode_tok_s": _mean(r["decode_tok_s"] for r in rs if r["decode_tok_s"]),
                "kv_bytes_peak": max(int(r["kv_bytes"] or 0) for r in rs),
            }
        )
    rows.sort(key=lambda r: (r["setting"], r["task"], _length_key(r["length"]), r["target"]))
    return rows


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(records: list[dict], rows: list[dict], plots: list[str]) -> str:
    targets = sorted({r["target"] for r in records}, key=lambda t: (parse_label(t)[1] is not None, t))
    settings = sorted({r["setting"] for r in records})
    out = [
        "# Evaluation report",
        "",
        f"{len(records)} predictions; targets: {', '.join(targets)}; settings: {', '.join(settings)}. "
        "Scores are means x100 (RULER string match, LongBench metrics, multiple-choice accuracy).",
    ]
    for setting in settings:
        cells = {(r["task"], r["length"], r["target"]): r for r in rows if r["setting"] == setting}
        keys = sorted({(t, ln) for t, ln, _ in cells}, key=lambda k: (k[0], _length_key(k[1])))
        table = [
            [t, ln] + [cells[t, ln, g]["score"] if (t, ln, g) in cells else "" for g in targets]
            for t, ln in keys
        ]
        per_task = [[cells[k]["score"] for k in cells if k[1] == "all" and k[2] == g] for g in targets]
        table.append(["**mean over tasks**", "all"] + [round(fmean(s), 2) if s else "" for s in per_task])
        out += ["", f"## Scores, setting `{setting}`", "", _md_table(["task", "length", *targets], table)]
    perf = defaultdict(list)
    for r in records:
        perf[r["target"], r["setting"]].append(r)
    table = [
        [
            target,
            setting,
            len(rs),
            round(_mean(r["prompt_tokens"] for r in rs)),
            f"{_mean(r['ttft_s'] for r in rs):.3f}",
            f"{_mean(r['decode_tok_s'] for r in rs if r['decode_tok_s']):.1f}",
            f"{max(int(r['kv_bytes'] or 0) for r in rs) / 2**20:.1f}",
        ]
        for (target, setting), rs in sorted(perf.items())
    ]
    header = ["target", "setting", "n", "prompt tokens", "TTFT s", "decode tok/s", "peak KV MiB"]
    out += ["", "## Latency and memory (means over samples; KV is the peak)", "", _md_table(header, table)]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _grid(n: int, size: float = 3.6):
    from matplotlib.figure import Figure  # Figure + savefig renders PNGs with Agg; no global backend state

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size * cols + 0.6, size * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def make_plots(out_dir: Path, records: list[dict], rows: list[dict]) -> list[str]:
    """Accuracy vs KV budget (one panel per task, one line per policy, budget-less targets as reference
    lines), accuracy vs context length, and TTFT / decode speed / peak KV vs prompt length (per length group)."""
    written = []
    for setting in sorted({r["setting"] for r in rows}):
        srows = [r for r in rows if r["setting"] == setting]
        overall = [r for r in srows if r["length"] == "all"]
        tasks = sorted({r["task"] for r in overall})
        if any(r["budget"] is not None for r in overall):
            fig, axes = _grid(len(tasks))
            for ax, task in zip(axes, tasks, strict=False):
                trows = [r for r in overall if r["task"] == task]
                for policy in sorted({r["policy"] for r in trows if r["budget"] is not None}):
                    pts = sorted(
                        (r["budget"], r["score"]) for r in trows if r["policy"] == policy and r["budget"]
                    )
                    ax.plot(*zip(*pts, strict=True), marker="o", label=policy)
                for i, r in enumerate(r for r in trows if r["budget"] is None):
                    ax.axhline(r["score"], linestyle="--", color=f"C{7 + i % 3}", label=r["target"])
                ax.set_xscale("log", base=2)
                ax.set(title=task, xlabel="KV budget (tokens)", ylabel="score", ylim=(-2, 102))
                ax.legend(fontsize="small")
            name = f"accuracy_vs_budget_{setting}.png"
            fig.savefig(out_dir / name, dpi=110)
            written.append(name)
        numeric = [r for r in srows if _length_key(r["length"])[0] == 0]
        if len({r["length"] for r in numeric}) > 1:
            tasks = sorted({r["task"] for r in numeric})
            fig, axes = _grid(len(tasks))
            for ax, task in zip(axes, tasks, strict=False):
                for target in sorted({r["target"] for r in numeric if r["task"] == task}):
                    pts = sorted(
                        (float(r["length"]), r["score"])
                        for r in numeric
                        if (r["task"], r["target"]) == (task, target)
                    )
                    ax.plot(*zip(*pts, strict=True), marker="o", label=target)
                ax.set_xscale("log", base=2)
                ax.set(title=task, xlabel="context length (tokens)", ylabel="score", ylim=(-2, 102))
                ax.legend(fontsize="small")
            name = f"accuracy_vs_length_{setting}.png"
            fig.savefig(out_dir / name, dpi=110)
            written.append(name)
    if records:
        fig, axes = _grid(3)
        series = defaultdict(list)
        for r in records:
            series[f"{r['target']} ({r['setting']})"].append(r)
        panels = [
            ("ttft_s", "TTFT (s)", 1),
            ("decode_tok_s", "decode tokens/s", 1),
            ("kv_bytes", "peak KV (MiB)", 2**20),
        ]
        for ax, (key, label, scale) in zip(axes, panels, strict=True):
            for name, rs in sorted(series.items()):
                by_length = defaultdict(
                    list
                )  # one point per length group: mean prompt tokens vs mean/peak value
                for r in rs:
                    by_length[r["length"]].append(r)
                agg = max if key == "kv_bytes" else _mean
                pts = sorted(
                    (_mean(r["prompt_tokens"] for r in g), agg((r[key] or 0) / scale for r in g))
                    for g in by_length.values()
                )
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            ax.set(xlabel="prompt tokens", ylabel=label, title=label)
        axes[0].legend(fontsize="small")
        fig.savefig(out_dir / "latency_memory.png", dpi=110)
        written.append("latency_memory.png")
    return written


def write_reports(out_dir: str | Path, records: list[dict[str, Any]], plots: bool = True) -> dict[str, Any]:
    """Write summary.json, summary.csv, report.md and the plots; returns the summary."""
    out = Path(out_dir)
    rows = summarize(records)
    summary = {
        "n_predictions": len(records),
        "targets": sorted({r["target"] for r in records}),
        "settings": sorted({r["setting"] for r in records}),
        "tasks": sorted({r["task"] for r in records}),
        "rows": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["task"])
        writer.writeheader()
        writer.writerows(rows)
    written = make_plots(out, records, rows) if plots else []
    (out / "report.md").write_text(_markdown(records, rows, written), encoding="utf-8")
    return summary


def report_from_predictions(out_dir: str | Path, plots: bool = True) -> dict[str, Any]:
    """Regenerate summary/report/plots from `out_dir/predictions.jsonl`."""
    return write_reports(out_dir, load_predictions(Path(out_dir) / PREDICTIONS), plots=plots)
