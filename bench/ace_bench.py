"""ACE on generated tasks with feedback: the base prompt (empty playbook) vs the playbook after offline
adaptation over a training split vs online adaptation on the test stream; playbook tokens and the wall
time of adaptation, on the same test queries in one sitting.

    python bench/ace_bench.py --model qwen2.5-coder-0.5b-instruct --tasks python_function,date_format \
        --n-train 12 --n-test 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import command, fmt, machine, write_result  # noqa: E402

from longserve import LLM  # noqa: E402
from longserve.ace import ACE, summary  # noqa: E402
from longserve.icl import make_task  # noqa: E402
from longserve.icl.embed import Embedder  # noqa: E402


def run_task(llm: LLM, embed: Embedder, name: str, args) -> dict:
    task = make_task(name, args.n_train + args.n_test, seed=0)
    train, test = task.split(args.n_train, args.n_test, seed=0)
    out = {"task": name}
    out["base"] = summary(ACE(llm, task, max_new_tokens=args.max_new_tokens).evaluate(test, progress=True))
    ace = ACE(llm, task, embed=embed, max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    offline = ace.adapt(train, progress=True)
    out["offline_adaptation"] = {**summary(offline), "wall_s": time.perf_counter() - start}
    out["after_offline"] = summary(ace.evaluate(test, progress=True))
    out["playbook"] = [b.__dict__ for b in ace.playbook.bullets]
    out["playbook_tokens_by_step"] = [r.playbook_tokens for r in offline]
    out["compressions_offline"] = ace.compressions
    # what the reflector and curator wrote on the first wrong training answers: the evidence of whether
    # the model can reflect at all
    out["examples"] = [
        {
            "input": r.input,
            "answer": r.answer,
            "feedback": r.feedback,
            "reflection": r.reflection,
            "curation": r.curation,
            "operations": r.operations,
        }
        for r in offline
        if not r.correct
    ][:3]
    online = ACE(llm, task, embed=embed, max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    records = online.evaluate(test, online=True, progress=True)
    out["online"] = {**summary(records), "wall_s": time.perf_counter() - start}
    out["online_tokens_by_step"] = [r.playbook_tokens for r in records]
    return out


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.5))
    ax = fig.add_subplot()
    for r in results:
        ax.plot(r["playbook_tokens_by_step"], marker=".", label=f"{r['task']} offline")
        ax.plot(r["online_tokens_by_step"], marker="x", linestyle="--", label=f"{r['task']} online")
    ax.set(xlabel="adaptation step", ylabel="playbook tokens", title="ACE playbook size over steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tasks", default="python_function,date_format")
    ap.add_argument("--n-train", type=int, default=12)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="reflector and curator replies")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/ace_bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, progress=False)
    embed = Embedder(llm)
    start = time.perf_counter()
    out = Path(args.out)
    results = []
    for name in args.tasks.split(","):
        results.append(run_task(llm, embed, name, args))
        report(args, results, time.perf_counter() - start, out)  # a cut-short run keeps finished tasks


def report(args, results: list[dict], wall: float, out: Path) -> None:
    plot(results, out.with_suffix(".png"))
    lines = [
        f"# ACE on {args.model} ({args.dtype})",
        "",
        f"`{command()}`  ",
        f"{machine()}; {wall / 60:.0f} min in all; load average {os.getloadavg()[0]:.1f}; the CPU was shared with other jobs (wall times are upper bounds)",
        "",
        "| task | phase | n | accuracy | playbook tokens | playbook bullets | wall s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for phase in ("base", "offline_adaptation", "after_offline", "online"):
            s = r[phase]
            bullets = len(r["playbook"]) if phase == "after_offline" else "-"
            wall_s = s.get("wall_s", s["seconds"])
            lines.append(
                f"| {r['task']} | {phase} | {s['n']} | {fmt(s['accuracy'], '.0%')} | "
                f"{s['playbook_tokens_final']} | {bullets} | {wall_s:.0f} |"
            )
    lines += ["", "`offline_adaptation` is the training stream itself (answers before each lesson).", ""]
    for r in results:
        lines.append(f"Playbook after offline adaptation on {r['task']}:")
        lines += [f"- [{b['id']}] {b['content']}" for b in r["playbook"]] or ["- (empty)"]
        lines.append("")
        lines.append(f"What the reflector and curator wrote on wrong training answers ({r['task']}):")
        lines.append("")
        for e in r["examples"]:
            lines += [
                f"- input `{e['input']}`, feedback `{e['feedback']}`",
                f"  - reflection: `{e['reflection']}`",
                f"  - curator: `{e['curation']}` -> {e['operations']}",
            ]
        lines.append("")
    lines.append(f"![playbook size]({out.with_suffix('.png').name})")
    write_result(
        out, {"model": args.model, "args": vars(args), "wall_s": wall, "tasks": results}, "\n".join(lines)
    )


if __name__ == "__main__":
    main()
