"""What KVzip's reconstruction pass costs next to a prefill of the same context.

Per natural-text sample (`natural_single`, chat template, the context only, as "compress once, ask
many" has it): time a prefill of the context into an uncompressed slot, then `run_scoring_pass` over
it (the repeat prompt + the context again, on top of the context's KV). The ratio pass / prefill is
the figure: kvpress's KVzip costs one reconstruction forward, about 2x the context's length, so a
pass near 2x a prefill is what the method costs and anything far above it is overhead.

`--save` writes the scores, `--compare` reads another run's and reports the largest difference, so
two implementations (e.g. `PYTHONPATH=/path/to/old/src`) can be checked for equal scores on a real
model. Times are the process's CPU seconds (`time.process_time`), steadier than wall time on a shared
machine: the CPU time a job gets is not the wall time it waits. `--profile` prints torch.profiler's top operators of one pass.

    python bench/kvzip_pass.py --samples 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from common import command, machine, write_result

from longserve import LLM
from longserve.eval.suite import make_suite
from longserve.kv.attention import PrefillBackend
from longserve.kv.cache import KVPool
from longserve.kv.policies import FullPolicy, make_policy
from longserve.kv.scoring_pass import run_scoring_pass


def prefill(llm: LLM, ids: list[int]) -> tuple[tuple[KVPool, int], float]:
    """The context in an uncompressed slot, and the process CPU seconds it took."""
    pool = KVPool(llm.loaded.args, 1, len(ids), dtype=llm.dtype)
    slot = pool.allocate(FullPolicy())
    started = time.process_time()
    backend = PrefillBackend(pool, slot, torch.arange(len(ids)), final=False)
    with torch.inference_mode():
        llm.loaded.model(torch.tensor([ids]), torch.arange(len(ids))[None], backend)
    backend.finish()
    return (pool, slot), time.process_time() - started


def same_top(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean over KV heads of the share of the top-k entries two score tensors [Hkv, L] agree on."""
    top_a, top_b = a.topk(k, -1).indices, b.topk(k, -1).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(top_a, top_b, strict=True)) / (
        k * len(a)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--save", help="write the scores of every sample here (torch.save)")
    ap.add_argument("--compare", help="scores saved by another run: report the largest difference")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of the first pass")
    ap.add_argument("--label", default="this tree", help="implementation name in the table")
    ap.add_argument(
        "--baseline", help="another run's JSON (e.g. the implementation before): its rows join the table"
    )
    ap.add_argument("--out", default="bench/results/kvzip_pass")
    args = ap.parse_args()
    llm = LLM(args.model, progress=False)
    count = lambda text: len(llm.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    samples = make_suite(["natural_single"], args.samples, args.length, count, seed=0)
    policy = make_policy("kvzip", ratio=0.25)
    rows, saved = [], []
    reference = torch.load(args.compare) if args.compare else None
    for i, sample in enumerate(samples):
        ids, _ = llm.split_chat(sample.context, sample.question, sep="")
        ids = ids[:-1]  # the engine runs the pass over every prompt token but the last
        src, prefill_s = prefill(llm, ids)
        chunks = policy.scoring_pass(ids, llm.tokenizer)
        started = time.process_time()
        if args.profile and i == 0:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                scores = run_scoring_pass(llm.loaded.model, src, src, chunks, len(ids))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        else:
            scores = run_scoring_pass(llm.loaded.model, src, src, chunks, len(ids))
        pass_s = time.process_time() - started
        diff = overlap = None
        if reference is not None:
            pairs = [(a, b) for a, b in zip(scores, reference[i], strict=True) if a is not None]
            diff = max(float((a - b).abs().max()) for a, b in pairs)
            overlap = sum(same_top(a, b, len(ids) // 4) for a, b in pairs) / len(pairs)
        saved.append(scores)
        rows.append(
            {
                "sample": sample.id,
                "context_tokens": len(ids),
                "pass_tokens": sum(len(c.ids) for c in chunks),
                "prefill_s": prefill_s,
                "pass_s": pass_s,
                "pass_over_prefill": pass_s / prefill_s,
                "max_abs_diff": diff,
                "top25_overlap": overlap,
                "label": args.label,
            }
        )
        print(rows[-1], flush=True)
    if args.save:
        torch.save(saved, args.save)
    load = os.getloadavg()
    if args.baseline:
        base = json.loads(Path(args.baseline).read_text())
        rows = [{"label": base["label"], **r} for r in base["rows"]] + rows
    lines = [
        f"# KVzip reconstruction pass vs prefill, {args.model}, {args.length}-token natural contexts",
        "",
        f"Command: `{command()}` ({time.strftime('%Y-%m-%d %H:%M')}; {machine()}, {llm.dtype}; load average "
        f"{load[0]:.1f} on 2 CPU cores shared with other jobs: timings are noisy, the ratio in one row is "
        "the figure). Rows: the implementation named in the first column; `max abs score diff` and the top-25% "
        "agreement (share of each KV head's top quarter of entries both keep) compare with the `--compare` scores.",
        "",
        "| implementation | sample | context tokens | pass tokens | prefill CPU s | pass CPU s | pass / prefill "
        "| max abs score diff | top-25% agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        diff = "-" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.2e}"
        agree = "-" if r.get("top25_overlap") is None else f"{r['top25_overlap']:.1%}"
        lines.append(
            f"| {r.get('label', '-')} | {r['sample']} | {r['context_tokens']} | {r['pass_tokens']} | "
            f"{r['prefill_s']:.2f} | {r['pass_s']:.2f} | {r['pass_over_prefill']:.1f}x | {diff} | {agree} |"
        )
    meta = {"command": command(), "machine": machine(), "dtype": str(llm.dtype), "load": load[0]}
    write_result(args.out, {"meta": meta, "label": args.label, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
