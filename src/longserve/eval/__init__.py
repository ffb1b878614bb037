"""Evaluation harness: synthetic (RULER-style) and code tasks, LongBench/custom data, metrics, runner.

Targets implement the small `Target` protocol (`count_tokens`, `answer`), so the same harness drives the
local engine and any OpenAI-compatible endpoint.
"""

from longserve.eval.longbench import (
    DatasetFormatError,
    LoadResult,
    PromptTemplate,
    load_custom,
    load_longbench,
    load_templates,
)
from longserve.eval.metrics import DATASET2METRIC, METRICS, score
from longserve.eval.report import load_predictions, parse_label, report_from_predictions
from longserve.eval.runner import run_eval, score_sample
from longserve.eval.sample import Sample, fit_length
from longserve.eval.suite import make_code_debug, make_suite
from longserve.eval.target import (
    EndpointError,
    EvalRequest,
    EvalResult,
    OpenAITarget,
    Target,
    estimate_tokens,
)
from longserve.eval.tasks import TASKS

__all__ = [
    "DATASET2METRIC",
    "METRICS",
    "TASKS",
    "DatasetFormatError",
    "EndpointError",
    "EvalRequest",
    "EvalResult",
    "LoadResult",
    "LocalTarget",
    "OpenAITarget",
    "PromptTemplate",
    "Sample",
    "Target",
    "estimate_tokens",
    "fit_length",
    "load_custom",
    "load_longbench",
    "load_predictions",
    "load_templates",
    "make_code_debug",
    "make_suite",
    "parse_label",
    "policy_label",
    "report_from_predictions",
    "run_eval",
    "score",
    "score_sample",
]


def __getattr__(name: str):
    """`LocalTarget` and `policy_label` load the engine (torch), so they are imported on first use."""
    if name in ("LocalTarget", "policy_label"):
        from longserve.eval import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
