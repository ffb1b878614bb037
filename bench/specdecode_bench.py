"""Speculative decoding: Qwen2.5-Coder 0.5B drafting for 1.5B on code prompts, greedy, vs target alone.

For each code prompt (chat template applied) the target decodes alone, then with the draft for every k in
`--k`, in the same process and run. Reported per k: decode tokens/s (tokens after the first / time after
the first token) and its ratio to target-only, acceptance rate, mean accepted drafts per round, target
forwards per generated token, and whether the output is token-for-token identical to target-only greedy.

Full size (the defaults): .venv/bin/python bench/specdecode_bench.py
Smoke test:              .venv/bin/python bench/specdecode_bench.py --prompts 1 --max-new-tokens 16 --k 4 \\
                             --out bench/results/specdecode_bench_smoke
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import command, fmt, machine, write_result

from longserve.llm import LLM
from longserve.spec import SpeculativeDecoder

CODE_PROMPTS = (
    "Write a Python function `is_palindrome(s)` that ignores case and punctuation, with a docstring.",
    "Implement binary search over a sorted list in Python and return -1 when the item is missing.",
    "Write a Python class `LRUCache` with get and put in O(1) using OrderedDict.",
    "Write a function that parses an ISO-8601 date string and returns the weekday name.",
    "Implement quicksort in Python without using list comprehensions.",
    "Write a Python generator that yields the Fibonacci numbers below n.",
    "Write a function `merge_intervals(intervals)` that merges overlapping intervals.",
    "Write a Python script that counts word frequencies in a text file and prints the top 10.",
    "Implement a thread-safe counter class in Python using threading.Lock.",
    "Write a function that flattens an arbitrarily nested list of integers.",
    "Write a Python function that validates an email address with a regular expression and explain it.",
    "Implement Dijkstra's shortest path algorithm in Python with heapq.",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument(
        "--prompts", type=int, default=8, help=f"how many code prompts (at most {len(CODE_PROMPTS)})"
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--k", default="2,4,6", help="comma-separated numbers of draft tokens")
    p.add_argument("--adaptive", action="store_true", help="adaptive k (default: fixed k per run)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="bench/results/specdecode_bench", help="output path without extension")
    return p.parse_args(argv)


def decode_rate(stats: dict, wall: float) -> float | None:
    """Tokens after the first per second after the first token (prefill excluded)."""
    n = stats["completion_tokens"] - 1
    decode_s = wall - (stats["ttft_s"] or 0.0)
    return n / decode_s if n > 0 and decode_s > 0 else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    t0 = time.perf_counter()
    target = LLM(args.target, dtype=args.dtype, progress=False)
    draft = LLM(args.draft, dtype=args.dtype, progress=False)
    load_s = time.perf_counter() - t0
    prompts = CODE_PROMPTS[: args.prompts]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    decoders = {k: SpeculativeDecoder(target, draft, k=k, adaptive=args.adaptive) for k in ks}
    target.generate(chats[0], max_new_tokens=2)  # warm-up (allocator, kernels)

    rows = {"target-only": {"tokens": 0, "decode_s": 0.0}}
    rows.update(
        {
            f"k={k}": {
                "tokens": 0,
                "decode_s": 0.0,
                "proposed": 0,
                "accepted": 0,
                "rounds": 0,
                "forwards": 0,
                "identical": 0,
                "same_prefix": 0,
                "compared": 0,
            }
            for k in ks
        }
    )
    for i, chat in enumerate(chats):
        start = time.perf_counter()
        base = target.generate(chat, max_new_tokens=args.max_new_tokens)[0]
        wall = time.perf_counter() - start
        r = rows["target-only"]
        r["tokens"] += base.stats["completion_tokens"] - 1
        r["decode_s"] += wall - base.stats["ttft_s"]
        for k, dec in decoders.items():
            start = time.perf_counter()
            out = dec.generate(chat, max_new_tokens=args.max_new_tokens)
            wall = time.perf_counter() - start
            s, r = out.stats, rows[f"k={k}"]
            r["tokens"] += s["completion_tokens"] - 1
            r["decode_s"] += wall - s["ttft_s"]
            r["proposed"] += s["draft_tokens_proposed"]
            r["accepted"] += s["draft_tokens_accepted"]
            r["rounds"] += s["verify_rounds"]
            r["forwards"] += s["target_forward_passes"]
            r["identical"] += out.token_ids == base.token_ids
            r["same_prefix"] += next(
                (j for j, (a, b) in enumerate(zip(out.token_ids, base.token_ids, strict=False)) if a != b),
                min(len(out.token_ids), len(base.token_ids)),
            )
            r["compared"] += len(base.token_ids)
        print(f"prompt {i + 1}/{len(chats)} done", file=sys.stderr, flush=True)

    base_rate = rows["target-only"]["tokens"] / rows["target-only"]["decode_s"]
    results = []
    for name, r in rows.items():
        rate = r["tokens"] / r["decode_s"] if r["decode_s"] > 0 else None
        row = {
            "run": name,
            "decode_tokens_per_s": rate,
            "speedup": rate / base_rate if rate else None,
            "generated_tokens": r["tokens"],
        }
        if name != "target-only":
            row.update(
                {
                    "acceptance_rate": r["accepted"] / r["proposed"] if r["proposed"] else None,
                    "mean_accepted_length": r["accepted"] / r["rounds"] if r["rounds"] else None,
                    "tokens_per_target_forward": r["tokens"] / r["forwards"] if r["forwards"] else None,
                    "identical_outputs": f"{r['identical']}/{len(chats)}",
                    "same_prefix_fraction": r["same_prefix"] / r["compared"] if r["compared"] else None,
                }
            )
        results.append(row)
    report = {
        "command": command(argv),
        "target": args.target,
        "draft": args.draft,
        "prompts": len(chats),
        "max_new_tokens": args.max_new_tokens,
        "adaptive": args.adaptive,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "load_s": load_s,
        "results": results,
    }
    write_result(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        "# Speculative decoding: draft-verify vs target-only (greedy)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Target `{report['target']}`, draft `{report['draft']}`, {report['prompts']} code prompts (chat template), "
        f"up to {report['max_new_tokens']} new tokens, {report['dtype']}, {'adaptive' if report['adaptive'] else 'fixed'}"
        f" k, {report['machine']}.",
        "",
        "| run | decode tok/s | vs target-only | acceptance | mean accepted / round | tokens / target forward "
        "| identical output | tokens before first difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['run']} | {fmt(r['decode_tokens_per_s'], '.2f')} | {fmt(r['speedup'], '.2f')}x | "
            f"{fmt(r.get('acceptance_rate'), '.1%')} | {fmt(r.get('mean_accepted_length'), '.2f')} | "
            f"{fmt(r.get('tokens_per_target_forward'), '.2f')} | {r.get('identical_outputs', '-')} | "
            f"{fmt(r.get('same_prefix_fraction'), '.1%')} |"
        )
    lines += [
        "",
        "Decode tok/s counts the tokens after the first over the time after the first token (prefill "
        "excluded: for speculative runs both the draft and the target prefill). Identical output: token-for-token equal to "
        "target-only greedy decoding of the same prompt; tokens before first difference: the share of target-only "
        "tokens reproduced before the two outputs first differ.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
