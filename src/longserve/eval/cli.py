"""`longserve eval` and `longserve eval-report`: run the evaluation harness from the command line.

    longserve eval --model smollm2-135m-instruct --tasks ruler --lengths 1024,2048 --samples 5 \\
        --policy full --policy snapkv@256 --setting both --out runs/smoke
    longserve eval --endpoint http://localhost:8000 --tasks niah_single_1 --lengths 4096
    longserve eval-report runs/smoke

What is evaluated is a list of *target specs* (`--policy`, repeatable): `NAME[@BUDGET][:KEY=VALUE...]`
with BUDGET in tokens (`256`, `2k` = 2048) or, below 1, a fraction of the prompt (`0.25`). Spec parsers are
pluggable (`register_spec_parser`, see `longserve.eval.specs`), so other kinds of targets (e.g. speculative
prefill) can join the same command without touching it: a parser returns an object with a `label` and
`build(llm) -> Target`.

This module is the command itself; specs live in `specs`, samples in `suite`/`tasks`, runs in `runner`
(their public names are re-exported here for existing callers).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from longserve.errors import InvalidParameterError, LongserveError
from longserve.eval.runner import RUN_CONFIG, print_summary, record_run, report_from_predictions, run_eval
from longserve.eval.specs import (
    SPEC_PARSERS,
    PolicySpec,
    SpecParser,
    TargetSpec,
    build_targets,
    parse_policy_spec,
    parse_spec,
    parse_value,
    register_spec_parser,
    target_specs,
)
from longserve.eval.suite import build_samples, check_fits, parse_lengths
from longserve.eval.target import SETTINGS, Target
from longserve.eval.tasks import RULER, parse_tasks

__all__ = [
    "RULER",
    "RUN_CONFIG",
    "SPEC_PARSERS",
    "PolicySpec",
    "SpecParser",
    "TargetSpec",
    "build_samples",
    "build_targets",
    "check_fits",
    "cmd_eval",
    "cmd_eval_report",
    "main",
    "parse_lengths",
    "parse_policy_spec",
    "parse_spec",
    "parse_tasks",
    "parse_value",
    "print_summary",
    "record_run",
    "register",
    "register_spec_parser",
    "target_specs",
]

DEFAULT_LENGTHS = "1024,2048"
#: Room left for the chat template when a prompt's length is checked against the context window and no
#: exact count is available (endpoints).
TEMPLATE_MARGIN = 64


def load_llm(args: argparse.Namespace) -> Any:
    """The local model named by `--model` (tests replace this, or pass `llm=` to `cmd_eval`)."""
    from longserve.llm import LLM

    kwargs: dict[str, Any] = {"dtype": args.dtype, "max_batch_size": max(8, args.batch_size)}
    if args.threads:
        kwargs["threads"] = args.threads
    return LLM(args.model, **kwargs)


def template_overhead(llm: Any) -> int:
    """Tokens the chat template adds around a user turn (0 for raw-text models)."""
    if not getattr(llm.tokenizer, "chat_template", None):
        return 0
    return len(llm.encode([{"role": "user", "content": ""}]))


def endpoint_target(args: argparse.Namespace) -> Target:
    from longserve.eval.target import OpenAITarget

    tokenizer = None
    if args.tokenizer:
        tokenizer = _hf_tokenizer(args.tokenizer)
    return OpenAITarget(
        args.endpoint,
        args.endpoint_model,
        name=args.endpoint_model or "endpoint",
        api_key=args.api_key,
        tokenizer=tokenizer,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
    )


def _hf_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    from longserve import zoo

    path = Path(name_or_path)
    if not path.exists():
        if not zoo.is_cached(name_or_path):
            raise InvalidParameterError(
                f"--tokenizer {name_or_path!r} is neither a directory nor a cached zoo model "
                f"(`longserve models pull {name_or_path}`)"
            )
        path = zoo.model_dir(name_or_path)
    return AutoTokenizer.from_pretrained(path)


# --------------------------------------------------------------------------- commands


def settings_of(text: str) -> list[str]:
    """`--setting`: one setting, or both for "both"."""
    return list(SETTINGS) if text == "both" else [text]


def cmd_eval(args: argparse.Namespace, llm: Any = None) -> int:
    """Run an evaluation; `llm` overrides `--model` (an already loaded `LLM`, e.g. a tiny test model)."""

    settings = settings_of(args.setting)
    if args.tasks:
        parse_tasks(args.tasks)  # fail on a typo before loading anything
    parse_lengths(args.lengths)
    if args.endpoint:
        if args.policy or args.policies:
            raise InvalidParameterError(
                "--policy/--policies choose local KV policies; they do not apply to --endpoint"
            )
        target = endpoint_target(args)
        targets: dict[str, Target] = {target.name: target}
        window, overhead, model = args.max_context, TEMPLATE_MARGIN, args.endpoint_model or args.endpoint
    else:
        specs = target_specs(args.policy, args.policies, args.budgets)
        llm = llm if llm is not None else load_llm(args)
        targets = build_targets(specs, llm)
        window = min(args.max_context or llm.context_window, llm.context_window)
        overhead, model = template_overhead(llm), getattr(llm.loaded, "name", args.model)
    count_tokens = next(iter(targets.values())).count_tokens
    samples = build_samples(args, count_tokens, window, overhead)

    out = Path(args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    record_run(out, args, model, list(targets), settings, len(samples), window)
    print(
        f"evaluating {len(samples)} samples x {len(targets)} target(s) x {len(settings)} setting(s) "
        f"on {model} -> {out}",
        file=sys.stderr,
    )
    summary = run_eval(
        samples,
        targets,
        out,
        settings=settings,
        resume=not args.no_resume,
        progress=not args.quiet,
        batch_size=args.batch_size,
        plots=not args.no_plots,
    )
    print_summary(summary)
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_eval_report(args: argparse.Namespace) -> int:
    from longserve.eval.report import PREDICTIONS

    path = Path(args.dir) / PREDICTIONS
    if not path.exists():
        raise InvalidParameterError(
            f"no {PREDICTIONS} in {args.dir}: give the --out directory of `longserve eval`"
        )
    summary = report_from_predictions(args.dir, plots=not args.no_plots)
    print_summary(summary)
    print(f"report: {Path(args.dir) / 'report.md'}")
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from longserve.zoo import DEFAULT_MODEL

    g = p.add_argument_group("what to evaluate")
    g.add_argument("--model", default=DEFAULT_MODEL, help="zoo name, HF directory or .gguf file")
    g.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="SPEC",
        help="target spec, repeatable: full, snapkv@256, streaming@1k:window=64, snapkv@0.25",
    )
    g.add_argument("--policies", help="comma list crossed with --budgets, e.g. full,snapkv,sage")
    g.add_argument("--budgets", help="comma list of KV budgets for --policies, e.g. 128,256")
    g.add_argument(
        "--setting",
        default="query_aware",
        choices=[*SETTINGS, "both"],
        help="query_aware: compress with the question visible; query_agnostic: context first",
    )
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--threads", type=int)
    g = p.add_argument_group("remote endpoint (instead of --model)")
    g.add_argument("--endpoint", metavar="URL", help="OpenAI-compatible base URL, e.g. http://localhost:8000")
    g.add_argument(
        "--endpoint-model", metavar="NAME", help="model name to request (default: the first listed)"
    )
    g.add_argument("--api-key")
    g.add_argument("--concurrency", type=int, default=4)
    g.add_argument("--max-retries", type=int, default=3)
    g.add_argument(
        "--tokenizer", help="zoo name or HF directory for exact token counts (default: ~4 chars/token)"
    )
    g.add_argument("--max-context", type=int, help="context window to check lengths against (endpoints)")
    g = p.add_argument_group("samples")
    g.add_argument(
        "--tasks",
        help="comma list of synthetic tasks, 'ruler' (default), 'natural' (needles in real prose) or 'all'",
    )
    g.add_argument("--lengths", default=DEFAULT_LENGTHS, help="prompt lengths in tokens, e.g. 1024,2048,4k")
    g.add_argument("--samples", type=int, default=5, help="samples per task and length")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--longbench", action="append", metavar="FILE", help="LongBench JSONL file (repeatable)")
    g.add_argument(
        "--longbench-max-tokens",
        type=int,
        help="truncate LongBench contexts in the middle to this many tokens (default: what fits)",
    )
    g.add_argument("--custom", metavar="DATA", help="any JSONL dataset, rendered with --templates")
    g.add_argument("--templates", metavar="T.json", help="task -> prompt template (see PromptTemplate)")
    g.add_argument("--template-task", metavar="NAME", help="which template of --templates to use")
    g.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="bad dataset lines")
    g.add_argument("--limit", type=int, help="at most N samples per dataset file")
    g.add_argument("--max-new-tokens", type=int, help="override every task's answer length")
    g.add_argument(
        "--answer-cap",
        type=int,
        metavar="N",
        help="at most N new tokens per answer (shorter task defaults stay)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output directory (default: runs/eval-<timestamp>)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="requests answered together (TTFT then includes the others' prefill; 1 gives clean latencies)",
    )
    g.add_argument("--no-resume", action="store_true", help="discard earlier predictions in --out")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    import longserve.specprefill.eval_target  # noqa: F401  (adds `--policy specprefill@KEEP[:draft=NAME]`)

    p = subparsers.add_parser(
        "eval",
        help="evaluate models/KV policies on synthetic, LongBench or custom tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_args(p)
    p.set_defaults(func=cmd_eval)
    p = subparsers.add_parser("eval-report", help="rebuild the report of an eval output directory")
    p.add_argument("dir")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_eval_report)


def main(argv: list[str] | None = None, llm: Any = None) -> int:
    """`longserve eval ...` / `longserve eval-report ...` on their own; `llm` replaces `--model`."""
    parser = argparse.ArgumentParser(prog="longserve")
    register(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return cmd_eval(args, llm=llm) if args.func is cmd_eval else args.func(args)
    except LongserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
