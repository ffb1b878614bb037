"""Distilling a domain draft: Qwen2.5-Coder 0.5B towards 1.5B on a small synthetic pandas domain.

Prompts come from templates (pandas data-wrangling requests), split into training and held-out prompts of
the same domain; a general (non-code) prompt set shows what the domain draft gives up. The pipeline is
`longserve distill`'s (`longserve.distill.run_distill`): the target's greedy answers with top-k log-probs,
white-box KL training of LoRA adapters (or full fine-tune / black-box via flags), then greedy speculative
decoding with a fixed k before and after training. Reported: acceptance rate and mean accepted drafts per
round on held-out domain prompts and on the general set, training time, teacher data size.

Qwen 0.5B and 1.5B share a tokenizer (required); SmolLM2 does not share Qwen's, so it cannot draft for it.

Full size (the defaults): .venv/bin/python bench/distill_bench.py
Smoke test:              .venv/bin/python bench/distill_bench.py --train-prompts 3 --held-out 1 --general 1 \\
                             --max-new-tokens 16 --eval-max-new-tokens 12 --epochs 3 --batch-size 1 \\
                             --no-register --out bench/results/distill_bench_smoke
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from pathlib import Path

import torch
from common import command, fmt, machine, write_result

from longserve.distill.data import GENERAL_PROMPTS
from longserve.distill.pipeline import run_distill
from longserve.distill.train import TrainConfig
from longserve.llm import LLM
from longserve.zoo import home

OPERATIONS = (
    "computes the mean of `price` per `city`",
    "drops rows where `age` is missing and resets the index",
    "adds a column `total` equal to `qty` times `unit_price`",
    "pivots `sales` with `region` as rows and `month` as columns",
    "merges `orders` with `customers` on `customer_id` (left join)",
    "converts the `date` column to datetime and extracts the year",
    "keeps the 5 rows with the largest `score`",
    "counts the unique values of `category`",
    "fills missing values of `income` with the median",
    "renames columns to snake_case",
    "computes a 7-day rolling mean of `visits`",
    "filters rows where `status` is 'active' and `balance` > 1000",
    "one-hot encodes the `color` column",
    "groups by `team` and returns the max and min of `points`",
    "sorts by `last_name` then `first_name`",
    "removes duplicate rows based on `email`",
)
FRAMINGS = (
    "Write a pandas snippet that {op} in a DataFrame `df`.",
    "Using pandas, write a function that takes a DataFrame and {op}.",
    "Show the pandas code that {op}; keep it short.",
)


def domain_prompts() -> list[str]:
    prompts = [f.format(op=op) for f, op in itertools.product(FRAMINGS, OPERATIONS)]
    random.Random(0).shuffle(prompts)
    return prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument(
        "--name", default="qwen2.5-coder-0.5b-pandas-draft", help="zoo name of the distilled draft"
    )
    p.add_argument("--train-prompts", type=int, default=36)
    p.add_argument("--held-out", type=int, default=12)
    p.add_argument("--general", type=int, default=8, help=f"general prompts (at most {len(GENERAL_PROMPTS)})")
    p.add_argument("--max-new-tokens", type=int, default=128, help="length of the target's answers")
    p.add_argument("--mode", choices=["whitebox", "blackbox"], default="whitebox")
    p.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lr", type=float, help="default 1e-5 (full) / 2e-4 (LoRA)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-max-new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="draft tokens per round in the evaluation")
    p.add_argument("--no-register", action="store_true", help="do not save the draft into the zoo cache")
    p.add_argument("--resume", action="store_true", help="reuse the workdir's teacher data (and checkpoint)")
    p.add_argument("--threads", type=int)
    p.add_argument("--workdir", help=f"default {home()}/distill/NAME")
    p.add_argument("--out", default="bench/results/distill_bench", help="output path without extension")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = domain_prompts()
    n = args.train_prompts + args.held_out
    if n > len(prompts):
        raise SystemExit(f"only {len(prompts)} domain prompts exist; lower --train-prompts/--held-out")
    t0 = time.perf_counter()
    target = LLM(args.target, progress=False)
    draft = LLM(args.draft, progress=False)
    load_s = time.perf_counter() - t0
    config = TrainConfig(
        mode=args.mode,
        lora=not args.full,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        checkpoint_every=0,
    )
    workdir = Path(args.workdir) if args.workdir else home() / "distill" / args.name
    start = time.perf_counter()
    report = run_distill(
        target,
        draft,
        args.name,
        workdir,
        prompts=prompts[:n],
        held_out=args.held_out,
        max_new_tokens=args.max_new_tokens,
        config=config,
        eval_max_new_tokens=args.eval_max_new_tokens,
        eval_k=args.k,
        general_prompts=list(GENERAL_PROMPTS[: args.general]),
        register=not args.no_register,
        resume=args.resume,
    )
    report.update(
        {
            "command": command(argv),
            "machine": machine(),
            "load_s": load_s,
            "total_s": time.perf_counter() - start,
            "max_new_tokens": args.max_new_tokens,
        }
    )
    write_result(args.out, report, markdown(report))
    return 0


def markdown(r: dict) -> str:
    d, t = r["data"], r["train"]
    made = (
        "reused from an earlier run" if d.get("teacher_reused") else f"made in {d['teacher_seconds']:.0f} s"
    )
    lines = [
        "# Distilling a domain draft (pandas code)",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Target `{r['target']}`, draft `{r['draft']}` -> `{r['name']}`, {r['mode']} "
        f"{'LoRA' if r['lora'] else 'full fine-tune'}, {r['machine']}.",
        "",
        f"Data: {d['train_prompts']} training prompts, {d['answer_tokens']} target answer tokens "
        f"(up to {r['max_new_tokens']} per prompt, greedy), top-{d['top_k_logits']} log-probs, "
        f"{d['teacher_file_bytes'] / 1e6:.2f} MB teacher file, "
        f"{made}. "
        f"Training: {t['steps']} steps ({t['epochs']} epochs, batch {t['batch_size']}, lr {t['lr']:g}, "
        f"{t['trainable_params']:,} trainable parameters) in {t['seconds']:.0f} s; "
        f"loss {fmt(t['first_loss'], '.3f')} -> {fmt(t['last_loss'], '.3f')}.",
        "",
    ]
    before, after = r.get("before", {}), r.get("after", {})
    key = "train_kl" if r["mode"] == "whitebox" else "train_ce"
    lines += [
        "| prompts | n | acceptance before | after | mean accepted before | after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for split, label in (("domain_held_out", "held-out domain"), ("general", "general")):
        b, a = before.get(split), after.get(split)
        if b and a:
            lines.append(
                f"| {label} | {b['prompts']} | {fmt(b['acceptance_rate'], '.1%')} | "
                f"{fmt(a['acceptance_rate'], '.1%')} | {fmt(b['mean_accepted_length'], '.2f')} | "
                f"{fmt(a['mean_accepted_length'], '.2f')} |"
            )
    lines += [
        "",
        f"{key} on the training prompts: {fmt(before.get(key), '.4f')} -> {fmt(after.get(key), '.4f')}. "
        f"Acceptance: greedy speculative decoding, fixed k, up to the eval token budget per prompt.",
        "",
    ]
    if r.get("model_dir"):
        lines += [
            f"Saved as `{r['name']}` in `{r['model_dir']}`: "
            f"`longserve generate --model {r['target']} --draft {r['name']} ...`",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
