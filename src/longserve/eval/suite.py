"""Building the samples of a run: synthetic suites (`make_suite`) and what the eval command line selects
(`build_samples`: synthetic tasks, LongBench files, a custom dataset), checked against the context window
before any model call.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

from longserve.errors import ContextLengthError, InvalidParameterError
from longserve.eval.longbench import MAX_NEW_TOKENS, load_custom, load_longbench, load_templates
from longserve.eval.sample import CountTokens, Sample
from longserve.eval.specs import split_list
from longserve.eval.tasks import DEPTH_SWEPT, RULER, TASKS, parse_tasks
from longserve.units import parse_count


def make_suite(
    tasks: Sequence[str],
    n_samples: int,
    target_tokens: int | Sequence[int],
    count_tokens: CountTokens,
    seed: int = 0,
    *,
    max_context: int | None = None,
    task_params: dict[str, dict] | None = None,
) -> list[Sample]:
    """Generate `n_samples` per task and length. Each sample has its own seed, so adding a task or a length
    never changes the other samples. Single-needle tasks sweep depth evenly from 0 to 1."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InvalidParameterError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    lengths = [target_tokens] if isinstance(target_tokens, int) else list(target_tokens)
    for length in lengths:
        if max_context is not None and length > max_context:
            raise InvalidParameterError(
                f"target length {length} exceeds the model's context window of {max_context} tokens"
            )
    samples = []
    for length in lengths:
        for task in tasks:
            for i in range(n_samples):
                rng = random.Random(f"{seed}:{task}:{length}:{i}")
                params = dict((task_params or {}).get(task, {}))
                if task in DEPTH_SWEPT and "depth" not in params:
                    params["depth"] = i / (n_samples - 1) if n_samples > 1 else 0.5
                sample = TASKS[task](rng, length, count_tokens, **params)
                samples.append(replace(sample, id=f"{task}/{length}/{i}", task=task))
    return samples


def make_code_debug(
    n_samples: int,
    target_tokens: int | list[int],
    count_tokens: CountTokens,
    seed: int = 0,
    *,
    max_context: int | None = None,
) -> list[Sample]:
    """Convenience wrapper: `make_suite(["code_debug"], ...)`."""
    return make_suite(["code_debug"], n_samples, target_tokens, count_tokens, seed, max_context=max_context)


def parse_lengths(text: str) -> list[int]:
    """`--lengths`: comma list of token counts, `k` = 1024 (`1024,4k` -> [1024, 4096])."""
    try:
        lengths = [parse_count(x) for x in split_list(text)]
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
