"""Scoring functions with LongBench's and RULER's definitions, dependency-free.

Per-reference metrics (`qa_f1`, `rouge_l`, ...) follow LongBench's `metrics.py` and are maximised over the
references; list metrics (`string_match_all`/`_part`, `choice`) see all references at once. Scores are in
[0, 1]; reports multiply by 100 like both benchmarks do.

Known deviations: `rouge_l` is the LCS-based ROUGE-L F1 over the whole token sequence, whereas LongBench's
`rouge` package computes a summary-level union-LCS over "."-split sentences (equal for one-sentence texts);
`classification_score` drops sub-class matches without LongBench's remove-while-iterating skip.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from longserve.errors import InvalidParameterError

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and English articles, collapse whitespace (SQuAD/LongBench)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    """Token-level F1 after `normalize_answer`."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F1 on whitespace tokens, "." treated as a separator (as the `rouge` package splits on it)."""
    p, r = prediction.replace(".", " ").split(), reference.replace(".", " ").split()
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, reference: str, *, all_classes: Sequence[str] = (), **_) -> float:
    """1/k if the reference is among the k class names found in the prediction (sub-names of it ignored)."""
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if not (c in reference and c != reference)]
    return 1.0 / len(found) if reference in found else 0.0


def _fraction_equal(prediction: str, wanted: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == wanted for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction that equal the reference's "Paragraph N"."""
    match = re.search(r"Paragraph (\d+)", reference)
    return _fraction_equal(prediction, match.group(1)) if match else 0.0


def count_score(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction that equal the reference count."""
    return _fraction_equal(prediction, str(reference))


def levenshtein_ratio(a: str, b: str) -> float:
    """python-Levenshtein's `ratio` (indel distance normalised by total length): 2 * LCS / (|a| + |b|)."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def code_sim_score(prediction: str, reference: str, **_) -> float:
    """`fuzz.ratio / 100` against the first prediction line that is not a comment or a code fence."""
    line = next(
        (
            ln
            for ln in prediction.lstrip("\n").split("\n")
            if "`" not in ln and "#" not in ln and "//" not in ln
        ),
        "",
    )
    return round(100 * levenshtein_ratio(line, reference)) / 100


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER: fraction of references contained (case-insensitively) in the prediction."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references) if references else 0.0


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER: 1 if any reference is contained (case-insensitively) in the prediction."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


def choice_score(prediction: str, references: Sequence[str]) -> float:
    """Multiple choice: `references = [letter, option_text]`. The letter counts if the answer starts with it
    ("B", "B.", "(B)") or names it after "answer"/"option"; otherwise the option text must be mentioned."""
    letter, text = references[0], references[1] if len(references) > 1 else None
    pred = prediction.strip().lstrip("*`'\" ")
    m = re.match(r"\(?([A-D])(?:[.):,\n*]|$)", pred) or re.search(
        r"(?i:answer|option)(?: is)?\s*[:\-]?\s*\**\(?([A-D])\b", pred
    )
    if m:
        return float(m.group(1) == letter)
    return float(bool(text) and text in pred)


Metric = Callable[..., float]
#: Metrics scored per reference and maximised over references (LongBench style).
PER_REFERENCE: dict[str, Metric] = {
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "count": count_score,
    "code_sim": code_sim_score,
}
#: Metrics that look at all references together.
ALL_REFERENCES: dict[str, Metric] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "choice": choice_score,
}
METRICS = {**PER_REFERENCE, **ALL_REFERENCES}

#: LongBench's `dataset2metric` (English tasks).
DATASET2METRIC = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "gov_report": "rouge_l",
    "qmsum": "rouge_l",
    "multi_news": "rouge_l",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge_l",
    "passage_count": "count",
    "passage_retrieval_en": "retrieval",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}


def score(
    metric: str,
    prediction: str,
    references: Sequence[str],
    *,
    all_classes: Sequence[str] | None = None,
    first_line: bool = False,
) -> float:
    """Score one prediction. `first_line` keeps only the first line (LongBench does so for few-shot tasks)."""
    if metric not in METRICS:
        raise InvalidParameterError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    if metric in ALL_REFERENCES:
        return ALL_REFERENCES[metric](prediction, list(references))
    fn = PER_REFERENCE[metric]
    return max((fn(prediction, r, all_classes=all_classes or ()) for r in references), default=0.0)
