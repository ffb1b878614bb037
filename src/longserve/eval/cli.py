"""`longserve eval` and `longserve eval-report`: run the evaluation harness from the command line.

    longserve eval --model smollm2-135m-instruct --tasks ruler --lengths 1024,2048 --samples 5 \\
        --policy full --policy snapkv@256 --setting both --out runs/smoke
    longserve eval --endpoint http://localhost:8000 --tasks niah_single_1 --lengths 4096
    longserve eval-report runs/smoke

What is evaluated is a list of *target specs* (`--policy`, repeatable): `NAME[@BUDGET][:KEY=VALUE...]`
with BUDGET in tokens (`256`, `2k`) or, below 1, a fraction of the prompt (`0.25`). Spec parsers are
pluggable (`register_spec_parser`), so other kinds of targets (e.g. speculative prefill) can join the same
command without touching it: a parser returns an object with a `label` and `build(llm) -> Target`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from longserve.errors import ContextLengthError, InvalidParameterError, LongserveError
from longserve.eval.sample import Sample
from longserve.eval.target import SETTINGS, Target

DEFAULT_LENGTHS = "1024,2048"
RUN_CONFIG = "run_config.json"
#: RULER's synthetic categories as implemented here (its qa_1/qa_2 need SQuAD/HotpotQA: use --longbench).
RULER = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)
#: Room left for the chat template when a prompt's length is checked against the context window and no
#: exact count is available (endpoints).
TEMPLATE_MARGIN = 64


# --------------------------------------------------------------------------- target specs


class TargetSpec(Protocol):
    """One thing to evaluate: `label` names it in the reports, `build` makes the target for a model."""

    label: str

    def build(self, llm: Any) -> Target: ...


@dataclass(frozen=True)
class PolicySpec:
    """The local engine under one KV policy: `snapkv@256`, `streaming@1k:window=64`, `snapkv@0.25`."""

    kv_policy: str = "full"
    kv_budget: int | None = None
    kv_ratio: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            from longserve.eval.local import policy_label

            label = policy_label(self.kv_policy, self.kv_budget, self.kv_ratio)
            extra = "".join(f":{k}={v}" for k, v in sorted(self.kwargs.items()))
            object.__setattr__(self, "label", label + extra)

    def build(self, llm: Any) -> Target:
        from longserve.eval.local import LocalTarget

        return LocalTarget(llm, self.kv_policy, self.kv_budget, self.kv_ratio, name=self.label, **self.kwargs)


SpecParser = Callable[[str], "TargetSpec | None"]
#: Extra spec parsers, tried in order before the KV-policy one; each returns None for specs it does not own.
SPEC_PARSERS: list[SpecParser] = []


def register_spec_parser(parser: SpecParser) -> SpecParser:
    """Let `--policy` accept another kind of target (usable as a decorator)."""
    if parser not in SPEC_PARSERS:
        SPEC_PARSERS.append(parser)
    return parser


def parse_value(text: str) -> Any:
    """ "true"/"false" -> bool, numbers -> int/float, anything else stays text (KEY=VALUE options)."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _budget(text: str, spec: str) -> tuple[int | None, float | None]:
    """ "256" -> (256, None); "2k" -> (2048, None); "0.25" -> (None, 0.25)."""
    try:
        if text.lower().endswith("k"):
            return int(float(text[:-1]) * 1024), None
        number = float(text)
    except ValueError:
        raise InvalidParameterError(
            f"bad budget in {spec!r}: use tokens (256, 2k) or a fraction of the prompt (0.25)"
        ) from None
    if 0 < number < 1:
        return None, number
    if number < 1 or not number.is_integer():
        raise InvalidParameterError(f"bad budget in {spec!r}: a token budget is a positive integer")
    return int(number), None


def parse_policy_spec(spec: str) -> PolicySpec:
    from longserve.kv.policies import REGISTRY

    head, *options = spec.strip().split(":")
    name, _, budget_text = head.partition("@")
    if name not in REGISTRY:
        raise InvalidParameterError(f"unknown kv policy {name!r} in {spec!r}; known: {', '.join(REGISTRY)}")
    budget, ratio = _budget(budget_text, spec) if budget_text else (None, None)
    kwargs = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or not key:
            raise InvalidParameterError(f"bad option {option!r} in {spec!r}: use KEY=VALUE, e.g. window=64")
        kwargs[key] = parse_value(value)
    return PolicySpec(name, budget, ratio, kwargs)


def parse_spec(spec: str) -> TargetSpec:
    for parser in SPEC_PARSERS:
        parsed = parser(spec)
        if parsed is not None:
            return parsed
    return parse_policy_spec(spec)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def target_specs(
    policy: Sequence[str] = (), policies: str | None = None, budgets: str | None = None
) -> list[TargetSpec]:
    """`--policy` specs, then the `--policies x --budgets` cross product ("full" once, without a budget);
    ["full"] when nothing is given. Labels must be unique."""
    texts = list(policy)
    names, sizes = _split(policies), _split(budgets)
    if sizes and not names:
        raise InvalidParameterError(
            "--budgets needs --policies (e.g. --policies snapkv,sage --budgets 128,256)"
        )
    for name in names:
        texts += [name] if name == "full" or not sizes else [f"{name}@{b}" for b in sizes]
    specs = [parse_spec(t) for t in texts or ["full"]]
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise InvalidParameterError(f"each target must be given once; repeated: {', '.join(dupes)}")
    return specs


def build_targets(specs: Sequence[TargetSpec], llm: Any) -> dict[str, Target]:
    return {spec.label: spec.build(llm) for spec in specs}


# --------------------------------------------------------------------------- samples


def parse_tasks(text: str) -> list[str]:
    """Comma list of task names; `ruler` expands to the RULER set and `all` to every synthetic task."""
    from longserve.eval.synthetic import TASKS

    tasks: list[str] = []
    for name in _split(text):
        expanded = RULER if name == "ruler" else tuple(TASKS) if name == "all" else (name,)
        tasks += [t for t in expanded if t not in tasks]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InvalidParameterError(
            f"unknown task(s) {', '.join(unknown)}; known: ruler, all, {', '.join(TASKS)}"
        )
    return tasks


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x) for x in _split(text)]
    except ValueError:
        raise InvalidParameterError(
            f"--lengths takes token counts like 1024,2048 or 4k, not {text!r}"
        ) from None
    if not lengths or min(lengths) <= 0:
        raise InvalidParameterError("--lengths needs at least one positive length")
    return lengths


def check_fits(
    samples: Sequence[Sample], count_tokens: Callable[[str], int], window: int, overhead: int
) -> None:
    """Every prompt plus its template `overhead` and answer must fit the context window; fail before any
    model call rather than in the middle of a run."""
    for s in samples:
        tokens = s.actual_tokens if s.actual_tokens is not None else count_tokens(s.prompt)
        if tokens + overhead + s.max_new_tokens > window:
            raise ContextLengthError(
                f"sample {s.id} needs {tokens} prompt + {overhead} template + {s.max_new_tokens} answer tokens, "
                f"more than the model's context window of {window}; use shorter --lengths "
                "(or a lower --max-new-tokens)"
            )


def build_samples(
    args: argparse.Namespace, count_tokens: Callable[[str], int], window: int | None, overhead: int = 0
) -> list[Sample]:
    """Synthetic tasks, LongBench files and a custom dataset, as selected by the command line."""
    from longserve.eval.longbench import MAX_NEW_TOKENS, load_custom, load_longbench, load_templates
    from longserve.eval.synthetic import make_suite

    samples: list[Sample] = []
    tasks = parse_tasks(args.tasks) if args.tasks else ([] if args.longbench or args.custom else list(RULER))
    if tasks:
        samples += make_suite(
            tasks, args.samples, parse_lengths(args.lengths), count_tokens, args.seed, max_context=window
        )
    for path in args.longbench or []:
        room = args.longbench_max_tokens or (
            window - overhead - (args.max_new_tokens or max(MAX_NEW_TOKENS.values())) if window else None
        )
        loaded = load_longbench(
            path, on_error=args.on_error, limit=args.limit, count_tokens=count_tokens, max_context_tokens=room
        )
        _report_skipped(path, loaded.skipped)
        samples += loaded.samples
    if args.custom:
        if not args.templates:
            raise InvalidParameterError(
                "--custom needs --templates T.json (and --template-task if it has several)"
            )
        templates = load_templates(args.templates)
        task = args.template_task or (next(iter(templates)) if len(templates) == 1 else None)
        if task not in templates:
            raise InvalidParameterError(
                f"--template-task must name one of the templates in {args.templates}: {', '.join(templates)}"
            )
        loaded = load_custom(
            args.custom,
            templates[task],
            task=task,
            on_error=args.on_error,
            limit=args.limit,
            count_tokens=count_tokens,
        )
        _report_skipped(args.custom, loaded.skipped)
        samples += loaded.samples
    if not samples:
        raise InvalidParameterError("no samples to evaluate: check --tasks, --longbench and --custom")
    if args.max_new_tokens:
        samples = [replace(s, max_new_tokens=args.max_new_tokens) for s in samples]
    if args.answer_cap:
        samples = [replace(s, max_new_tokens=min(s.max_new_tokens, args.answer_cap)) for s in samples]
    if window:
        check_fits(samples, count_tokens, window, overhead)
    return samples


def _report_skipped(path: str, skipped: list[str]) -> None:
    if skipped:
        print(f"{path}: skipped {len(skipped)} bad line(s), e.g. {skipped[0]}", file=sys.stderr)


# --------------------------------------------------------------------------- models and endpoints


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
    return list(SETTINGS) if text == "both" else [text]


def cmd_eval(args: argparse.Namespace, llm: Any = None) -> int:
    """Run an evaluation; `llm` overrides `--model` (an already loaded `LLM`, e.g. a tiny test model)."""
    from longserve.eval.runner import run_eval

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


def record_run(
    out: Path,
    args: argparse.Namespace,
    model: str,
    targets: list[str],
    settings: list[str],
    n_samples: int,
    window: int | None,
) -> None:
    """Append this run to `out/run_config.json`, refusing to resume into predictions it would corrupt.

    Resuming skips samples by id (`task/length/i`), but a sample's content also depends on the model, the
    seed, `--samples` (single-needle depths are spread over them) and the answer length: a rerun that
    changes any of them for a length already in `out` must use another `--out` or `--no-resume`.
    """
    path = out / RUN_CONFIG
    old = json.loads(path.read_text("utf-8")) if path.exists() and not args.no_resume else {}
    hint = "use another --out, or --no-resume to discard the earlier predictions"
    if old.get("model", model) != model:
        raise InvalidParameterError(f"{out} holds predictions of {old['model']}, not {model}; {hint}")
    synthetic = dict(old.get("synthetic", {}))
    if args.tasks or not (args.longbench or args.custom):
        suite = {
            "samples": args.samples,
            "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "answer_cap": args.answer_cap,
        }
        for length in map(str, parse_lengths(args.lengths)):
            before = synthetic.setdefault(length, suite)
            if before != suite:
                changed = ", ".join(
                    f"{k} {before.get(k)} -> {v}" for k, v in suite.items() if before.get(k) != v
                )
                raise InvalidParameterError(
                    f"{out} has {length}-token samples made with other options ({changed}); {hint}"
                )
    run = {
        "argv": getattr(args, "argv", None) or sys.argv[1:],
        "targets": targets,
        "settings": settings,
        "n_samples": n_samples,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    config = {
        "model": model,
        "context_window": window,
        "synthetic": synthetic,
        "runs": [*old.get("runs", []), run],
    }
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def print_summary(summary: dict[str, Any], out=None) -> None:
    """Overall score per task (rows) and target (columns), one table per setting."""
    out = out or sys.stdout
    rows = [r for r in summary["rows"] if r["length"] == "all"]
    for setting in summary["settings"]:
        cells = {(r["task"], r["target"]): r["score"] for r in rows if r["setting"] == setting}
        targets, tasks = summary["targets"], sorted({t for t, _ in cells})
        width = max([len(t) for t in tasks] + [4])
        print(f"[{setting}]", file=out)
        print(f"{'task':{width}}  " + "  ".join(f"{t:>10}" for t in targets), file=out)
        for task in tasks:
            scores = [cells.get((task, t)) for t in targets]
            print(
                f"{task:{width}}  " + "  ".join(" " * 10 if s is None else f"{s:10.1f}" for s in scores),
                file=out,
            )


def cmd_eval_report(args: argparse.Namespace) -> int:
    from longserve.eval.report import PREDICTIONS
    from longserve.eval.runner import report_from_predictions

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
    g.add_argument("--tasks", help="comma list of synthetic tasks, 'ruler' (default) or 'all'")
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
