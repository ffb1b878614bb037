"""Speculative prefill: TTFT and accuracy vs full prefill, same-family and cross-family drafts.

Target Qwen2.5-Coder-1.5B; drafts SmolLM2-135M (cross-family: text spans, keep rate in target tokens) and
Qwen2.5-Coder-0.5B (same family: kept ids at their original positions). Prompts come from the synthetic
suite (`make_suite`) at each length (target tokens). For every sample the target first answers the full
prompt (the baseline, same run), then each draft x keep rate. TTFT with speculative prefill includes the
draft's scoring; a draft scores each sample once and the measured time is charged to every keep rate
(selection and re-tokenization are re-run and timed per keep). Accuracy is the suite's metric; "rel. acc"
is mean score with speculative prefill / mean score with the full prompt; "agree" is the share of samples
whose score equals the full prompt's.

Full size (the defaults): .venv/bin/python bench/specprefill_bench.py
Smoke test:  .venv/bin/python bench/specprefill_bench.py --target qwen2.5-coder-0.5b-instruct \\
                 --drafts smollm2-135m-instruct --lengths 512 --samples 1 --keeps 0.25 \\
                 --out bench/results/specprefill_bench_smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import command, machine, write_result

from longserve.eval.runner import score_sample
from longserve.eval.suite import make_suite
from longserve.llm import LLM
from longserve.specprefill import Importance, SpecPrefillConfig, SpeculativePrefill, same_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--drafts", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    p.add_argument("--lengths", default="4096,8192", help="comma-separated prompt lengths (target tokens)")
    p.add_argument("--samples", type=int, default=4, help="samples per task and length")
    p.add_argument("--tasks", default="niah_single_1,niah_multikey,vt", help="synthetic tasks")
    p.add_argument("--keeps", default="0.1,0.25,0.5", help="comma-separated keep rates")
    p.add_argument("--keep-tail", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, help="default: each task's own")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/specprefill_bench", help="output path without extension")
    return p.parse_args(argv)


class ScoreOnce(SpeculativePrefill):
    """Scores each prompt once; later keep rates reuse the scores and are charged the measured time."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cache: dict[tuple[int, ...], tuple[Importance, float]] = {}
        self.charged = 0.0  # scoring time skipped by the last compress() thanks to the cache

    def score(self, ids, config=None) -> Importance:
        key = tuple(ids)
        if key in self.cache:
            imp, seconds = self.cache[key]
            self.charged += seconds
            return imp
        t0 = time.perf_counter()
        imp = super().score(ids, config)
        self.cache[key] = (imp, time.perf_counter() - t0)
        return imp


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    keeps = [float(x) for x in args.keeps.split(",")]
    drafts = [d for d in args.drafts.split(",") if d]
    t0 = time.perf_counter()
    target = LLM(args.target, dtype=args.dtype, progress=False)
    sps = {
        d: ScoreOnce(LLM(d, dtype=args.dtype, progress=False), SpecPrefillConfig(keep_tail=args.keep_tail))
        for d in drafts
    }
    load_s = time.perf_counter() - t0
    tok = target.tokenizer

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    samples = make_suite(
        args.tasks.split(","), args.samples, lengths, count, seed=args.seed, max_context=target.context_window
    )
    target.generate("Warm-up.", max_new_tokens=2)
    records = []
    for i, sample in enumerate(samples):
        prompt = [{"role": "user", "content": sample.context + sample.question}]
        max_new = args.max_new_tokens or sample.max_new_tokens
        full = target.generate(prompt, max_new_tokens=max_new)[0]
        base = {
            "sample": sample.id,
            "task": sample.task,
            "length": sample.target_tokens,
            "answers": sample.answers,
        }
        full_score = score_sample(sample, full.text)
        records.append(
            {
                **base,
                "setting": "full",
                "draft": None,
                "keep": 1.0,
                "ttft_s": full.stats["ttft_s"],
                "prompt_tokens": full.prompt_tokens,
                "kept_tokens": full.prompt_tokens,
                "ratio": 1.0,
                "score": full_score,
                "prediction": full.text,
            }
        )
        print(
            f"[{i + 1}/{len(samples)}] {sample.id}: full TTFT {full.stats['ttft_s']:.2f} s score {full_score:.2f}",
            file=sys.stderr,
        )
        for name, sp in sps.items():
            for keep in keeps:
                sp.charged = 0.0
                cp = sp.compress(target, prompt, keep=keep)
                charged = sp.charged
                out = sp.generate_compressed(target, [cp], max_new_tokens=max_new)[0]
                ttft = out.stats["ttft_s"] + charged
                score = score_sample(sample, out.text)
                records.append(
                    {
                        **base,
                        "setting": "specprefill",
                        "draft": name,
                        "keep": keep,
                        "path": cp.path,
                        "ttft_s": ttft,
                        "target_ttft_s": out.stats["target_ttft_s"],
                        "score_s": cp.score_s + charged,
                        "compress_s": cp.compress_s + charged,
                        "prompt_tokens": cp.original_tokens,
                        "kept_tokens": cp.kept_tokens,
                        "ratio": cp.ratio,
                        "content_ratio": cp.content_ratio,
                        "windows": cp.windows,
                        "score": score,
                        "agree": score == full_score,
                        "prediction": out.text,
                    }
                )
                print(
                    f"    {name} keep {keep:g}: TTFT {ttft:.2f} s (score {cp.score_s + charged:.2f} s) "
                    f"kept {cp.kept_tokens}/{cp.original_tokens} score {score:.2f}",
                    file=sys.stderr,
                )

    rows = []
    for length in lengths:
        full_rows = [r for r in records if r["setting"] == "full" and r["length"] == length]
        full_ttft = statistics.mean(r["ttft_s"] for r in full_rows)
        full_acc = statistics.mean(r["score"] for r in full_rows)
        rows.append(
            {
                "length": length,
                "draft": "(full prompt)",
                "path": "-",
                "keep": 1.0,
                "ratio": 1.0,
                "ttft_s": full_ttft,
                "ttft_ratio": 1.0,
                "score_s": 0.0,
                "accuracy": full_acc,
                "rel_accuracy": 1.0,
                "agree": 1.0,
                "n": len(full_rows),
            }
        )
        for name in drafts:
            for keep in keeps:
                sel = [
                    r for r in records if r["draft"] == name and r["keep"] == keep and r["length"] == length
                ]
                acc = statistics.mean(r["score"] for r in sel)
                ttft = statistics.mean(r["ttft_s"] for r in sel)
                rows.append(
                    {
                        "length": length,
                        "draft": name,
                        "path": sel[0]["path"],
                        "keep": keep,
                        "ratio": statistics.mean(r["ratio"] for r in sel),
                        "ttft_s": ttft,
                        "ttft_ratio": ttft / full_ttft,
                        "score_s": statistics.mean(r["score_s"] for r in sel),
                        "accuracy": acc,
                        "rel_accuracy": acc / full_acc if full_acc else None,
                        "agree": statistics.mean(r["agree"] for r in sel),
                        "n": len(sel),
                    }
                )

    same = {d: same_tokenizer(target.tokenizer, sp.draft.tokenizer) for d, sp in sps.items()}
    result = {
        "command": command(argv),
        "target": args.target,
        "drafts": drafts,
        "same_tokenizer": same,
        "lengths": lengths,
        "keeps": keeps,
        "tasks": args.tasks.split(","),
        "samples_per_task": args.samples,
        "machine": machine(),
        "load_s": load_s,
        "summary": rows,
        "records": records,
    }
    lines = [
        "# Speculative prefill vs full prefill",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Target `{args.target}`; tasks {args.tasks}; {args.samples} sample(s) per task and length; {machine()}.",
        "TTFT includes the draft's scoring; ratio = kept / original prompt tokens (target tokens).",
        "",
        "| length | draft | path | keep | kept ratio | TTFT (s) | TTFT vs full | draft scoring (s) | accuracy "
        "| rel. acc | agree | n |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rel = f"{r['rel_accuracy']:.2f}" if r["rel_accuracy"] is not None else "n/a"
        lines.append(
            f"| {r['length']} | {r['draft']} | {r['path']} | {r['keep']:g} | {r['ratio']:.3f} | "
            f"{r['ttft_s']:.2f} | {r['ttft_ratio']:.2f}x | {r['score_s']:.2f} | {r['accuracy']:.2f} | "
            f"{rel} | {r['agree']:.2f} | {r['n']} |"
        )
    write_result(args.out, result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
