"""Long-context code debugging (InfiniteBench Code.Debug style), built from this machine's Python stdlib.

Four candidate functions from four stdlib modules are hidden among other stdlib modules; one of them gets a
single, real bug (flipped comparison, off-by-one `range` stop or `+ 1`/`- 1`, swapped and/or, wrong returned
variable) picked on its AST and applied as a minimal text edit, so the rest of the source stays
byte-identical. The model must say which option (A-D) is buggy. Why stdlib: real code, no download, and
identical on every machine with the same Python version (the version is recorded in the metadata).
"""

from __future__ import annotations

import ast
import random
import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from longserve.errors import InvalidParameterError
from longserve.eval.sample import CountTokens, Sample, fit_length

LETTERS = "ABCD"
MAX_FILE_CHARS = 100_000
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "turtledemo",
    "lib2to3",
    "ensurepip",
}
_FLIP = {ast.Lt: ">=", ast.GtE: "<", ast.Gt: "<=", ast.LtE: ">", ast.Eq: "!=", ast.NotEq: "=="}
_FLIP.update({ast.Is: "is not", ast.IsNot: "is", ast.In: "not in", ast.NotIn: "in"})
_OP_RE = {ast.Lt: "<", ast.GtE: ">=", ast.Gt: ">", ast.LtE: "<=", ast.Eq: "==", ast.NotEq: "!="}
_OP_RE.update({ast.Is: "is", ast.IsNot: r"is\s+not", ast.In: "in", ast.NotIn: r"not\s+in"})
HEAD = (
    "Below are Python source files from a large project. Exactly one function in them was deliberately "
    "modified to contain an obvious bug.\n\n"
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Sorted relative paths of the stdlib's own modules (no tests, no third-party packages)."""
    root = stdlib_root()
    rels = (p.relative_to(root) for p in root.rglob("*.py"))
    return tuple(sorted(r.as_posix() for r in rels if not _SKIP_DIRS.intersection(r.parts[:-1])))


def _read(rel: str) -> str | None:
    try:
        text = (stdlib_root() / rel).read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() and "\r" not in text and len(text) <= MAX_FILE_CHARS else None


def _doc(rel: str, text: str) -> str:
    return f"# ===== file: {rel} =====\n{text}" + ("" if text.endswith("\n") else "\n")


@dataclass
class Mutation:
    kind: str
    start: int  # character offsets into the file text
    end: int
    replacement: str

    def apply(self, text: str) -> str:
        return text[: self.start] + self.replacement + text[self.end :]


class _Offsets:
    """Maps AST (line, UTF-8 byte column) positions to character offsets."""

    def __init__(self, text: str):
        self.text = text
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def __call__(self, lineno: int, col: int) -> int:
        start = self.starts[lineno - 1]
        end = self.starts[lineno] if lineno < len(self.starts) else len(self.text)
        return start + len(self.text[start:end].encode()[:col].decode("utf-8", errors="ignore"))

    def span(self, node: ast.expr) -> tuple[int, int]:
        return self(node.lineno, node.col_offset), self(node.end_lineno, node.end_col_offset)


def _operator_site(off: _Offsets, left: ast.expr, right: ast.expr, pattern: str) -> tuple[int, int] | None:
    """Span of the operator between two operands, if only whitespace/parentheses surround it."""
    a, b = off.span(left)[1], off.span(right)[0]
    m = re.fullmatch(rf"[\s()]*({pattern})[\s()]*", off.text[a:b])
    return (a + m.start(1), a + m.end(1)) if m else None


def find_mutations(
    func: ast.FunctionDef | ast.AsyncFunctionDef, off: _Offsets, rng: random.Random
) -> list[Mutation]:
    """Every place in `func` where one small edit plants a plausible bug."""
    args = func.args.posonlyargs + func.args.args + func.args.kwonlyargs
    local = {a.arg for a in args if a.arg not in ("self", "cls")}
    local |= {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    sites = []
    for node in ast.walk(func):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _FLIP:
            op = type(node.ops[0])
            if span := _operator_site(off, node.left, node.comparators[0], _OP_RE[op]):
                sites.append(Mutation("flip_comparison", *span, _FLIP[op]))
        elif isinstance(node, ast.BoolOp):
            word = "and" if isinstance(node.op, ast.And) else "or"
            if span := _operator_site(off, node.values[0], node.values[1], word):
                sites.append(Mutation("swap_and_or", *span, "or" if word == "and" else "and"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "range"
            and len(node.args) in (1, 2)
            and not node.keywords
            and isinstance(node.args[-1], ast.Name | ast.Attribute | ast.Call | ast.Subscript)
        ):
            end = off.span(node.args[-1])[1]
            sites.append(Mutation("off_by_one", end, end, " - 1"))
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Add | ast.Sub)
            and isinstance(node.right, ast.Constant)
            and node.right.value == 1
        ):
            plus = isinstance(node.op, ast.Add)
            if span := _operator_site(off, node.left, node.right, r"\+" if plus else "-"):
                sites.append(Mutation("off_by_one", *span, "-" if plus else "+"))
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Name):
            others = sorted(local - {node.value.id})
            if others:
                sites.append(Mutation("wrong_return", *off.span(node.value), rng.choice(others)))
    return sites


@dataclass
class _Candidate:
    rel: str
    text: str
    name: str
    start: int  # offset of the function in `text`
    source: str  # the function's source text
    sites: list[Mutation]


def _pick_candidates(
    files: list[str], budget: int, count_tokens: CountTokens, rng: random.Random
) -> list[_Candidate]:
    """Four functions with unique names and mutation sites, from four files of at most `budget` tokens."""
    chosen: list[_Candidate] = []
    for rel in files:
        text = _read(rel)
        if text is None or len(text) > budget * 12 or any(f"def {c.name}(" in text for c in chosen):
            continue
        if count_tokens(_doc(rel, text)) > budget:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        off = _Offsets(text)
        nodes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        funcs = [
            f
            for f in tree.body + [m for c in nodes for m in c.body]
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            and not f.name.startswith("__")
            and 4 <= f.end_lineno - f.lineno <= 80
            and text.count(f"def {f.name}(") == 1
            and all(f"def {f.name}(" not in c.text for c in chosen)  # names stay unique in the context
        ]
        candidates = [(f, sites) for f in funcs if (sites := find_mutations(f, off, rng))]
        if candidates:
            f, sites = rng.choice(candidates)
            start, end = off(f.lineno, f.col_offset), off(f.end_lineno, f.end_col_offset)
            chosen.append(_Candidate(rel, text, f.name, start, text[start:end], sites))
            if len(chosen) == len(LETTERS):
                return chosen
    raise InvalidParameterError(
        f"could not find {len(LETTERS)} candidate functions small enough; use a longer target"
    )


def code_debug(
    rng: random.Random, target_tokens: int, count_tokens: CountTokens, *, depth: float | None = None
) -> Sample:
    """One multiple-choice sample; `depth` (0..1) places the buggy function's file, else it is random."""
    files = list(stdlib_files())
    rng.shuffle(files)
    cands = _pick_candidates(files, max(64, target_tokens // 8), count_tokens, rng)
    buggy = rng.randrange(len(cands))
    bug = cands[buggy]
    by_kind: dict[str, list[Mutation]] = {}
    for m in bug.sites:
        by_kind.setdefault(m.kind, []).append(m)
    kinds = sorted(by_kind)
    rng.shuffle(kinds)  # kind first, so frequent comparisons do not crowd out the other bug types
    for site in (m for k in kinds for m in rng.sample(by_kind[k], len(by_kind[k]))):  # first edit that parses
        mutated_text = site.apply(bug.text)
        try:
            ast.parse(mutated_text)
            break
        except SyntaxError:
            continue
    else:
        raise InvalidParameterError(f"no valid mutation in {bug.rel}:{bug.name}")
    mutated_source = mutated_text[bug.start : bug.start + len(bug.source) + len(mutated_text) - len(bug.text)]
    cand_docs = [_doc(c.rel, mutated_text if c is bug else c.text) for c in cands]

    names, used = {c.name for c in cands}, {c.rel for c in cands}
    lines, starts, total = [], [], 0
    for rel in files:
        text = _read(rel)
        if rel in used or text is None or any(f"def {n}(" in text for n in names):
            continue
        doc = _doc(rel, text)
        starts.append(len(lines))
        lines += doc.splitlines(keepends=True)
        total += count_tokens(doc)
        if total > target_tokens * 1.2 + 256:
            break
    starts = starts or [0]
    depths = [rng.random() for _ in cands]
    if depth is not None:
        depths[buggy] = depth
    options = "".join(f"{letter}. {c.name} (in {c.rel})\n" for letter, c in zip(LETTERS, cands, strict=True))
    question = (
        f"\nWhich function contains the deliberate bug?\n{options}"
        "Answer with the letter of the correct option (A, B, C or D) only."
    )

    def build(n: int) -> tuple[str, str]:
        points = sorted((max(s for s in starts if s <= d * n), i) for i, d in enumerate(depths))
        pieces, prev = [], 0
        for at, i in points:
            pieces += lines[prev:at] + [cand_docs[i]]
            prev = at
        return HEAD + "".join(pieces + lines[prev:n]) + "\n", question

    n, (context, question), got = fit_length(build, count_tokens, target_tokens, max_units=len(lines))
    line = bug.text.count("\n", 0, site.start) + 1
    return Sample(
        id="",
        task="code_debug",
        context=context,
        question=question,
        answers=[LETTERS[buggy], bug.name],
        metric="choice",
        max_new_tokens=16,
        target_tokens=target_tokens,
        actual_tokens=got,
        depth=depths[buggy],
        metadata={
            "options": [{"letter": L, "name": c.name, "file": c.rel} for L, c in zip(LETTERS, cands, strict=True)],
            "bug": {"file": bug.rel, "function": bug.name, "kind": site.kind, "line": line,
                    "before": bug.text[site.start : site.end], "after": site.replacement},
            "python": sys.version.split()[0],
            "filler_lines": n,
            "_original_function": bug.source,
            "_mutated_function": mutated_source,
        },
    )  # fmt: skip
