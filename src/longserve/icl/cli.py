"""`longserve icl` (accuracy vs shots per selection policy, block reuse vs re-prefill) and `longserve ace`
(playbook adaptation), each writing JSON, a markdown report and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from longserve.errors import InvalidParameterError


def register(subparsers) -> None:
    from longserve.icl.datasets import GENERATED
    from longserve.icl.selection import ORDERINGS, SELECTIONS

    tasks = f"{', '.join(GENERATED)} or a JSONL file"
    p = subparsers.add_parser("icl", help="many-shot prompting: accuracy vs shots, block reuse vs re-prefill")
    p.add_argument("--model", default=None, help="zoo name, HF directory or .gguf (default: the zoo default)")
    p.add_argument("--task", default="rule_classification", help=tasks)
    p.add_argument("--shots", default="0,4,16,64", help="comma list; 'max' = as many as fit the window")
    p.add_argument("--selection", default="random", help=f"comma list of {', '.join(SELECTIONS)}")
    p.add_argument("--ordering", default="random", choices=ORDERINGS)
    p.add_argument("--dynamic", action="store_true", help="select demonstrations per query (no reuse)")
    p.add_argument("--compare-reprefill", action="store_true", help="also re-prefill the block per query")
    p.add_argument("--kv-policy", default="full", help="KV policy of the reused block")
    p.add_argument("--kv-ratio", type=float, help="keep this fraction of the block (compressing policies)")
    p.add_argument("--n-train", type=int, default=200, help="demonstration pool size")
    p.add_argument("--n-test", type=int, default=50, help="test queries per point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--out", default="icl-report", help="output directory")
    p.set_defaults(func=run_icl)

    p = subparsers.add_parser("ace", help="grow an ACE playbook on a task with feedback, then evaluate it")
    p.add_argument("--model", default=None)
    p.add_argument("--task", default="date_format", help=tasks)
    p.add_argument("--playbook", default="playbook.json", help="read if it exists, written after adapting")
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--online", action="store_true", help="also adapt on the test stream (after answering)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--out", default="ace-report")
    p.set_defaults(func=run_ace)


def parse_shots(text: str) -> list[int | str]:
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part == "max":
            out.append(part)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise InvalidParameterError(f"--shots takes whole numbers or 'max', got {part!r}")
    return out


def _llm(args):
    from longserve.llm import LLM
    from longserve.zoo import DEFAULT_MODEL

    return LLM(args.model or DEFAULT_MODEL, dtype=args.dtype)


def run_icl(args) -> int:
    from longserve.icl.datasets import make_task
    from longserve.icl.embed import Embedder
    from longserve.icl.runner import ManyShot, ShotConfig
    from longserve.icl.selection import SELECTIONS

    shots, selections = parse_shots(args.shots), [s.strip() for s in args.selection.split(",")]
    if bad := [s for s in selections if s not in SELECTIONS]:
        raise InvalidParameterError(f"unknown selection {bad[0]!r}: use {', '.join(SELECTIONS)}")
    task = make_task(args.task, args.n_train + args.n_test, seed=args.seed)
    train, test = task.split(args.n_train, args.n_test, seed=args.seed)
    llm = _llm(args)
    runner = ManyShot(llm, task, embed=Embedder(llm))
    rows = []
    for selection in selections:
        for n in shots:
            k = runner.max_shots(train) if n == "max" else min(n, len(train))
            modes = (
                [(False, True)]
                if args.dynamic
                else [(True, False)] + ([(False, False)] if args.compare_reprefill else [])
            )
            for reuse, dynamic in modes:
                config = ShotConfig(
                    k, selection, args.ordering, args.kv_policy, args.kv_ratio, reuse, dynamic, args.seed
                )
                rows.append(runner.run(train, test, config, progress=True).summary())
                print(
                    json.dumps(
                        {k: rows[-1][k] for k in ("shots", "selection", "reuse", "accuracy", "ttft_p50_s")}
                    )
                )
    write_icl_report(Path(args.out), rows, task.name, llm.loaded.name)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def write_icl_report(out: Path, rows: list[dict], task: str, model: str) -> None:
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"task": task, "model": model, "rows": rows}, indent=1))
    lines = [
        f"# Many-shot ICL: {task} on {model}",
        "",
        "| shots | selection | ordering | mode | KV | n | accuracy | TTFT p50 | prompt tokens/query | block tokens |",
        "|---:|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mode = "dynamic" if r["dynamic"] else ("reuse" if r["reuse"] else "re-prefill")
        kv = r["kv_policy"] + (f"@{r['kv_ratio']}" if r["kv_ratio"] else "")
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.0%}"
        ttft = "-" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.2f} s"
        lines.append(
            f"| {r['shots']} | {r['selection']} | {r['ordering']} | {mode} | {kv} | {r['n']} | {acc} | {ttft} "
            f"| {r['prompt_tokens_mean'] or 0:.0f} | {r['block_tokens']} |"
        )
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for selection in dict.fromkeys(r["selection"] for r in rows):
        points = sorted(
            (r["shots"], r["accuracy"])
            for r in rows
            if r["selection"] == selection and r["reuse"] and r["accuracy"] is not None
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=selection)
    ax.set(xlabel="shots", ylabel="accuracy", title=f"{task}: accuracy vs shots", ylim=(0, 1))
    ax.set_xscale("symlog", linthresh=4)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_shots.png", dpi=110)
    lines += ["", "![accuracy vs shots](accuracy_vs_shots.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def run_ace(args) -> int:
    from longserve.ace import ACE, Playbook, summary
    from longserve.icl.datasets import make_task
    from longserve.icl.embed import Embedder

    task = make_task(args.task, args.n_train + args.n_test, seed=args.seed)
    train, test = task.split(args.n_train, args.n_test, seed=args.seed)
    path = Path(args.playbook)
    playbook = Playbook.load(path) if path.exists() else Playbook()
    llm = _llm(args)
    ace = ACE(llm, task, playbook, embed=Embedder(llm))
    results = {"base": summary(ACE(llm, task).evaluate(test, progress=True))}
    offline = ace.adapt(train, epochs=args.epochs, progress=True)
    ace.playbook.save(path)
    results["offline_adaptation"] = summary(offline)
    results["after_offline"] = summary(ace.evaluate(test, progress=True))
    if args.online:
        results["online"] = summary(ace.evaluate(test, online=True, progress=True))
        ace.playbook.save(path)
    write_ace_report(Path(args.out), results, offline, task.name, llm.loaded.name)
    print(json.dumps({k: v["accuracy"] for k, v in results.items()}))
    return 0


def write_ace_report(out: Path, results: dict, offline, task: str, model: str) -> None:
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"task": task, "model": model, **results}, indent=1))
    lines = [
        f"# ACE: {task} on {model}",
        "",
        "| phase | n | accuracy | playbook tokens | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for phase, s in results.items():
        acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.0%}"
        lines.append(f"| {phase} | {s['n']} | {acc} | {s['playbook_tokens_final']} | {s['seconds']:.0f} |")
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot([r.playbook_tokens for r in offline], marker=".")
    ax.set(xlabel="adaptation step", ylabel="playbook tokens", title="playbook size over steps")
    fig.tight_layout()
    fig.savefig(out / "playbook_size.png", dpi=110)
    lines += ["", "![playbook size](playbook_size.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
