"""Many-shot ICL: accuracy vs shots per selection policy, and the per-query TTFT of a reused (compressed
once) demonstration block vs re-prefilling it for every query, on the same queries in one sitting.

    python bench/icl_bench.py --model smollm2-135m-instruct --tasks rule_classification,cipher \
        --shots 0,4,16,64,max --selections random,similar,diverse,balanced --n-test 50 --reprefill-shots 64
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import command, fmt, machine, write_result  # noqa: E402

from longserve import LLM  # noqa: E402
from longserve.icl import ManyShot, ShotConfig, make_task  # noqa: E402
from longserve.icl.cli import parse_shots  # noqa: E402
from longserve.icl.embed import Embedder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default="rule_classification,cipher")
    ap.add_argument("--shots", default="0,4,16,64,max")
    ap.add_argument("--selections", default="random,similar,diverse,balanced")
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--reprefill-shots", type=int, default=64, help="shots at which re-prefill is compared")
    ap.add_argument(
        "--compressed", default="snapkv:0.25", help="comma list of policy:ratio for the compressed-block rows"
    )
    ap.add_argument("--max-shots", type=int, default=256, help="cap for 'max'")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/icl_bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, progress=False)
    embed = Embedder(llm)
    rows = []
    start = time.perf_counter()
    result = {"command": command(), "machine": machine(), "model": args.model, "dtype": args.dtype}
    for task_name in args.tasks.split(","):
        task = make_task(task_name, args.n_train + args.n_test, seed=0)
        train, test = task.split(args.n_train, args.n_test, seed=0)
        runner = ManyShot(llm, task, embed=embed)
        most = runner.max_shots(train, args.max_shots)
        for config in configs(args, most):
            summary = runner.run(train, test, config, progress=True).summary()
            rows.append({"task": task_name, **summary})
            print(rows[-1], flush=True)
            # written after every row: a run cut short (shared CPU, a deadline) keeps what it measured
            result.update(rows=rows, wall_s=time.perf_counter() - start, load_avg=os.getloadavg())
            with contextlib.redirect_stdout(io.StringIO()):
                write_result(args.out, result, markdown(result, args.reprefill_shots))
    png = Path(args.out).with_suffix(".png")
    plot(rows, png)
    write_result(
        args.out, result, markdown(result, args.reprefill_shots) + f"\n\n![accuracy vs shots]({png.name})"
    )


def configs(args, most: int) -> list[ShotConfig]:
    """The first selection's sweep, then the re-prefill and compressed-block rows at `--reprefill-shots`
    (the comparisons a cut-short run should still have), then the other selections."""
    selections = args.selections.split(",")
    sweep = [n if n != "max" else most for n in parse_shots(args.shots) if n == "max" or n <= most]
    out = [ShotConfig(n, selections[0]) for n in sweep]
    out.append(ShotConfig(args.reprefill_shots, selections[0], reuse=False))
    for spec in filter(None, args.compressed.split(",")):
        policy, ratio = spec.split(":")
        out.append(ShotConfig(args.reprefill_shots, selections[0], kv_policy=policy, kv_ratio=float(ratio)))
    return out + [ShotConfig(n, selection) for selection in selections[1:] for n in sweep]


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy vs shots, one panel per task, one line per selection (reused `full` blocks)."""
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = Figure(figsize=(5 * len(tasks), 3.8))
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for selection in dict.fromkeys(r["selection"] for r in rows if r["task"] == task):
            points = sorted(
                (r["shots"], r["accuracy"])
                for r in rows
                if r["task"] == task
                and r["selection"] == selection
                and r["reuse"]
                and r["kv_policy"] == "full"
            )
            ax.plot(*zip(*points, strict=True), marker="o", label=selection)
        ax.set(xlabel="shots", ylabel="accuracy", title=task, ylim=(0, 1.02))
        ax.set_xscale("symlog", linthresh=4)
        shots = sorted({r["shots"] for r in rows if r["task"] == task})
        ax.set_xticks(shots, [str(n) for n in shots])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict, reprefill_shots: int) -> str:
    rows = result["rows"]
    lines = [
        f"# Many-shot ICL on {result['model']} ({result['dtype']})",
        "",
        f"`{result['command']}`  ",
        f"{result['machine']}; {result['wall_s'] / 60:.0f} min; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['load_avg'])}",
        "",
        "| task | shots | selection | mode | KV | n | accuracy | TTFT p50 | prompt tokens/query | block tokens | block prefill |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mode = "reuse" if r["reuse"] else "re-prefill"
        kv = r["kv_policy"] + (f"@{r['kv_ratio']:g}" if r["kv_ratio"] else "")
        lines.append(
            f"| {r['task']} | {r['shots']} | {r['selection']} | {mode} | {kv} | {r['n']} "
            f"| {fmt(r['accuracy'], '.0%')} | {fmt(r['ttft_p50_s'], '.3f')} s | {r['prompt_tokens_mean']:.0f} "
            f"| {r['block_tokens']} | {r['block_prefill_s']:.1f} s |"
        )
    lines += ["", "TTFT ratio re-prefill / reuse at the same shots (same queries, same run):", ""]
    for task in dict.fromkeys(r["task"] for r in rows):

        def find(reuse: bool, kv: str = "full", task: str = task):
            return next(
                (
                    r
                    for r in rows
                    if r["task"] == task
                    and r["shots"] == reprefill_shots
                    and r["reuse"] == reuse
                    and r["selection"] == "random"
                    and r["kv_policy"] == kv
                ),
                None,
            )

        a, b = find(True), find(False)
        if a and b and a["ttft_p50_s"]:
            lines.append(
                f"- {task}, {reprefill_shots} shots: {b['ttft_p50_s'] / a['ttft_p50_s']:.1f}x lower TTFT with reuse "
                f"(accuracy {fmt(a['accuracy'], '.0%')} reuse vs {fmt(b['accuracy'], '.0%')} re-prefill)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
