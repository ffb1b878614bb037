"""Local LongBench-format data and custom Jinja2-templated datasets -> `Sample`s.

No dataset hub is assumed: point the loader at JSONL files you have. LongBench's prompts are split into a
context part and a question part so the query-agnostic setting can compress the context alone; joined they
give LongBench's prompt (wording kept, whitespace typos fixed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from longserve.errors import InvalidParameterError, LongserveError
from longserve.eval.metrics import DATASET2METRIC, METRICS
from longserve.eval.sample import CountTokens, Sample

_QA = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
_STORY = "Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation."
_QASPER = (
    "Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question "
    'cannot be answered based on the information in the article, write "unanswerable". If the question is a '
    'yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)
#: dataset -> (context part with {context}, question part with {input}); prompt = context part + question part.
TEMPLATES: dict[str, tuple[str, str]] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        + _STORY
        + "\n\nStory: {context}\n\n",
        "Now, answer the question based on the story as concisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    ),
    "qasper": (
        "You are given a scientific article and a question. " + _QASPER + "\n\nArticle: {context}\n\n",
        "Answer the question based on the above article as concisely as you can, using a single phrase or "
        "sentence if possible. " + _QASPER.split(". ", 1)[1] + "\n\nQuestion: {input}\n\nAnswer:",
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\n",
        "Now, answer the following question based on the above text, only give me the answer and do not output "
        "any other words.\n\nQuestion: {input}\nAnswer:",
    ),
    **dict.fromkeys(
        ("hotpotqa", "2wikimqa", "musique"),
        (
            _QA + "\n\nThe following are given passages.\n{context}\n\n",
            _QA + "\n\nQuestion: {input}\nAnswer:",
        ),
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\n",
        "Now, write a one-page summary of the report.\n\nSummary:",
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\n",
        "Now, answer the query based on the above meeting transcript in one or more sentences.\n\n"
        "Query: {input}\nAnswer:",
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news.\n\nNews:\n{context}\n\n",
        "Now, write a one-page summary of all the news.\n\nSummary:",
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n",
        "{input}",
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n",
        "{input}",
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n",
        "{input}",
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n",
        "Please enter the final count of unique paragraphs after removing duplicates. The output format should "
        "only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\n",
        "The following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract "
        'is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    ),
    "lcc": ("Please complete the code given below. \n{context}", "Next line of code:\n"),
    "repobench-p": ("Please complete the code given below. \n{context}", "{input}Next line of code:\n"),
}
#: LongBench's `dataset2maxlen`.
MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}  # fmt: skip
#: Few-shot / completion tasks: LongBench sends them without a chat template and scores the first line only.
RAW_PROMPT = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}
FIRST_LINE = {"trec", "triviaqa", "samsum"}

OnError = Literal["raise", "skip"]


class DatasetFormatError(LongserveError):
    """A dataset file does not match the expected schema; the message names the file and line."""


@dataclass
class LoadResult:
    samples: list[Sample]
    skipped: list[str] = field(default_factory=list)  # "path:line: reason" for each skipped line

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def _records(path: Path, on_error: OnError, skipped: list[str]) -> Iterator[tuple[int, dict]]:
    if on_error not in ("raise", "skip"):
        raise InvalidParameterError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    _fail(f"{path}:{lineno}: invalid JSON ({e})", on_error, skipped)
                    continue
                yield lineno, record


def _fail(message: str, on_error: OnError, skipped: list[str]) -> None:
    if on_error == "raise":
        raise DatasetFormatError(message)
    skipped.append(message)


def truncate_middle(text: str, max_tokens: int, count_tokens: CountTokens, overhead: int = 0) -> str:
    """Keep the head and tail of `text` so that `overhead + count_tokens(text)` fits `max_tokens`.

    LongBench truncates token ids in the middle; we only have a counter, so we bisect on characters.
    """
    if overhead + count_tokens(text) <= max_tokens:
        return text
    lo, hi = 0, len(text) // 2  # characters kept at each end
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if overhead + count_tokens(text[:mid] + text[-mid:]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + text[-lo:] if lo else ""


def load_longbench(
    path: str | Path,
    *,
    dataset: str | None = None,
    on_error: OnError = "raise",
    limit: int | None = None,
    count_tokens: CountTokens | None = None,
    max_context_tokens: int | None = None,
) -> LoadResult:
    """Read a LongBench JSONL file (`input, context, answers, all_classes, length, dataset, _id` per line).

    `dataset` overrides the per-line field (e.g. for renamed files); LongBench-E's `_e` suffix is accepted.
    With `count_tokens`, `actual_tokens` is filled and `max_context_tokens` (a prompt budget, like LongBench's
    `max_length`: leave room for generation) truncates the context in the middle to fit it.
    """
    path = Path(path)
    result = LoadResult([])
    for lineno, ex in _records(path, on_error, result.skipped):
        if limit is not None and len(result.samples) >= limit:
            break
        name = str(dataset or ex.get("dataset") or "").removesuffix("_e")
        problem = next(
            (f"missing field {k!r}" for k in ("input", "context", "answers", "_id") if k not in ex), None
        )
        if problem is None and name not in TEMPLATES:
            problem = f"unknown LongBench dataset {name!r}; known: {', '.join(TEMPLATES)}"
        if problem is None and not (
            isinstance(ex["answers"], list) and all(isinstance(a, str) for a in ex["answers"])
        ):
            problem = "'answers' must be a list of strings"
        if problem:
            _fail(f"{path}:{lineno}: {problem}", on_error, result.skipped)
            continue
        head, tail = TEMPLATES[name]
        question = tail.format(input=ex["input"] or "")
        context = ex["context"] or ""
        if max_context_tokens and count_tokens:
            overhead = count_tokens(head.format(context="") + question)
            context = truncate_middle(context, max_context_tokens, count_tokens, overhead)
        context = head.format(context=context)
        result.samples.append(
            Sample(
                id=f"{name}/{ex['_id']}",
                task=name,
                context=context,
                question=question,
                answers=list(ex["answers"]),
                metric=DATASET2METRIC[name],
                max_new_tokens=MAX_NEW_TOKENS[name],
                actual_tokens=count_tokens(context + question) if count_tokens else None,
                metadata={
                    "all_classes": ex.get("all_classes") or [],
                    "length": ex.get("length"),
                    "first_line": name in FIRST_LINE,
                    "raw_prompt": name in RAW_PROMPT,
                },
            )
        )
    return result


# --------------------------------------------------------------------------- custom datasets


@dataclass
class PromptTemplate:
    """PromptSource-style mapping of one example (a JSON object) to a prompt and its reference answer(s).

    `prompt` and `target` are Jinja2 templates over the example's fields. If `question` is given, `prompt`
    renders the context part and `question` the part appended after it (used by query-agnostic
    compression). `target` may render several references separated by `|||`.
    Loaded from JSON: `{"prompt": ..., "target": ..., "question": ..., "metric": "qa_f1", "max_new_tokens": 64}`
    or PromptSource's single `{"jinja": "prompt ||| target"}`.
    """

    prompt: str
    target: str
    question: str = ""
    metric: str = "qa_f1"
    max_new_tokens: int = 64

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptTemplate:
        d = dict(d)
        if "jinja" in d:
            prompt, sep, target = d.pop("jinja").partition("|||")
            if not sep:
                raise InvalidParameterError("a 'jinja' template needs '|||' between prompt and target")
            d.setdefault("prompt", prompt.strip())
            d.setdefault("target", target.strip())
        unknown = set(d) - {"prompt", "target", "question", "metric", "max_new_tokens"}
        if unknown or "prompt" not in d or "target" not in d:
            raise InvalidParameterError(
                f"a prompt template needs 'prompt' and 'target' (optional: question, metric, max_new_tokens); "
                f"unknown keys: {sorted(unknown)}"
            )
        if d.get("metric", "qa_f1") not in METRICS:
            raise InvalidParameterError(f"unknown metric {d['metric']!r}; known: {', '.join(METRICS)}")
        return cls(**d)


def load_templates(path: str | Path) -> dict[str, PromptTemplate]:
    """A JSON file mapping task name -> template dict (see `PromptTemplate`)."""
    data = json.loads(Path(path).read_text("utf-8"))
    return {task: PromptTemplate.from_dict(spec) for task, spec in data.items()}


def _renderer(template: PromptTemplate) -> Callable[[dict], tuple[str, str, str]]:
    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)
    try:
        parts = [env.from_string(t) for t in (template.prompt, template.question, template.target)]
    except TemplateError as e:
        raise InvalidParameterError(f"invalid Jinja2 template: {e}") from e

    def render(example: dict) -> tuple[str, str, str]:
        prompt, question, target = (p.render(**example) for p in parts)
        return prompt, question, target

    return render


def load_custom(
    path: str | Path,
    template: PromptTemplate,
    *,
    task: str,
    on_error: OnError = "raise",
    id_field: str = "id",
    limit: int | None = None,
    count_tokens: CountTokens | None = None,
) -> LoadResult:
    """Read any JSONL dataset and render each line through `template` (missing fields are errors)."""
    path = Path(path)
    render = _renderer(template)
    result = LoadResult([])
    for lineno, ex in _records(path, on_error, result.skipped):
        if limit is not None and len(result.samples) >= limit:
            break
        try:
            context, question, target = render(ex)
        except (TemplateError, TypeError, ValueError) as e:
            _fail(f"{path}:{lineno}: template error ({e})", on_error, result.skipped)
            continue
        answers = [a.strip() for a in target.split("|||") if a.strip()]
        result.samples.append(
            Sample(
                id=f"{task}/{ex.get(id_field, lineno)}",
                task=task,
                context=context,
                question=question,
                answers=answers,
                metric=template.metric,
                max_new_tokens=template.max_new_tokens,
                actual_tokens=count_tokens(context + question) if count_tokens else None,
                metadata={"line": lineno},
            )
        )
    return result
