"""The task registry: generated tasks by name, or a JSONL file of {"input", "target"} records."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from longserve.errors import InvalidParameterError
from longserve.icl.code_task import python_function
from longserve.icl.tasks import (
    Example,
    Task,
    arithmetic,
    cipher,
    date_format,
    function_call,
    rule_classification,
)

GENERATED: dict[str, Callable[[int, int], Task]] = {
    "rule_classification": rule_classification,
    "cipher": cipher,
    "date_format": date_format,
    "arithmetic": arithmetic,
    "function_call": function_call,
    "python_function": python_function,
}


def make_task(name: str, n: int = 240, seed: int = 0) -> Task:
    """A generated task by name, or a JSONL file of {"input", "target" (or "label")} records."""
    if name in GENERATED:
        return GENERATED[name](n, seed)
    path = Path(name)
    if path.suffix == ".jsonl" or path.exists():
        return load_jsonl(path)
    raise InvalidParameterError(f"unknown task {name!r}: use one of {', '.join(GENERATED)} or a .jsonl file")


def load_jsonl(path: Path, instruction: str = "") -> Task:
    if not path.is_file():
        raise InvalidParameterError(f"dataset file not found: {path}")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            target = record["target"] if "target" in record else record["label"]
            examples.append(Example(str(record["input"]), str(target), record.get("label")))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise InvalidParameterError(
                f'{path}:{number}: expected a JSON object with "input" and "target" (or "label"): {exc}'
            ) from None
    if not examples:
        raise InvalidParameterError(f"{path} holds no examples")
    return Task(path.stem, instruction, examples, 32)
