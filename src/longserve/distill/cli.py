"""`longserve distill`: train a domain draft model for speculative decoding and register it in the zoo."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def register(subparsers) -> argparse.ArgumentParser:
    from longserve.zoo import home

    p = subparsers.add_parser(
        "distill",
        help="distill a domain draft model from a target (for `generate --draft`)",
        description="Generate the target's answers to domain prompts, fine-tune the draft on them (white-box "
        "KL to the target's top-k, or black-box cross-entropy; full or LoRA), report the acceptance "
        "rate before/after and save the draft as a zoo model usable as --draft NAME.",
    )
    p.add_argument("--target", required=True, help="zoo name, HF directory or .gguf of the target")
    p.add_argument(
        "--draft",
        required=True,
        help="the draft to start from (must share the target's tokenizer "
        "for white-box training and for --draft use)",
    )
    p.add_argument("--name", required=True, help="zoo name of the distilled draft")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help='JSONL file, one {"prompt": "..."} per line')
    src.add_argument("--domain", help="short domain description; the target writes the prompts")
    p.add_argument("--num-prompts", type=int, default=64, help="prompts to synthesize with --domain")
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of prompts kept for evaluation")
    p.add_argument("--max-new-tokens", type=int, default=128, help="length of the target's answers")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy answers")
    p.add_argument("--top-k-logits", type=int, default=16, help="target log-probs stored per position")
    p.add_argument("--mode", choices=["whitebox", "blackbox"], default="whitebox")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lr", type=float, help="default 1e-5 (full) / 2e-4 (LoRA)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--workdir", help=f"data, checkpoints and report (default {home()}/distill/NAME)")
    p.add_argument("--resume", action="store_true", help="reuse the teacher data and the last checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after acceptance evaluation")
    p.add_argument("--eval-max-new-tokens", type=int, default=64)
    p.add_argument("--num-draft-tokens", type=int, default=4, help="k used by the acceptance evaluation")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_distill)
    return p


def cmd_distill(args) -> int:
    from longserve.distill.data import read_prompts
    from longserve.distill.pipeline import run_distill
    from longserve.distill.train import TrainConfig
    from longserve.llm import LLM
    from longserve.zoo import home

    config = TrainConfig(
        mode=args.mode,
        lora=args.lora,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_len=args.max_len,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    prompts = read_prompts(args.prompts) if args.prompts else None
    extra = {"threads": args.threads} if args.threads else {}
    target = LLM(args.target, dtype=args.dtype, **extra)
    draft = LLM(args.draft, dtype=args.dtype, **extra)
    workdir = Path(args.workdir) if args.workdir else home() / "distill" / args.name
    report = run_distill(
        target,
        draft,
        args.name,
        workdir,
        prompts=prompts,
        domain=args.domain,
        num_prompts=args.num_prompts,
        held_out=args.held_out,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k_logits=args.top_k_logits,
        config=config,
        eval_max_new_tokens=args.eval_max_new_tokens,
        eval_k=args.num_draft_tokens,
        run_eval=not args.no_eval,
        resume=args.resume,
        seed=args.seed,
    )
    report["command"] = "longserve " + shlex.join(sys.argv[1:])
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(
        f"report: {workdir / 'report.json'}\nuse it: longserve generate --model {args.target} --draft {args.name} ..."
    )
    return 0


def summary(report: dict) -> str:
    lines = [
        f"distilled {report['draft']} -> {report['name']} ({report['mode']}{', LoRA' if report['lora'] else ''}) "
        f"on {report['data']['train_prompts']} prompts / {report['data']['answer_tokens']} target tokens in "
        f"{report['train']['seconds']:.0f} s"
    ]
    for split in ("domain_held_out", "general"):
        before, after = report.get("before", {}).get(split), report.get("after", {}).get(split)
        if (
            before
            and after
            and before["acceptance_rate"] is not None
            and after["acceptance_rate"] is not None
        ):
            lines.append(
                f"  {split:16} acceptance {before['acceptance_rate']:.1%} -> {after['acceptance_rate']:.1%}"
                f"  (mean accepted {before['mean_accepted_length']:.2f} -> "
                f"{after['mean_accepted_length']:.2f})"
            )
    return "\n".join(lines)
