"""What every benchmark writes: the command that reproduces it, the machine it ran on, and its result as
JSON next to a markdown table (`OUT.json`, `OUT.md`). Scripts run as `python bench/NAME.py`, so this file
imports as `common`."""

from __future__ import annotations

import json
import platform
import shlex
import sys
from pathlib import Path

import torch


def command(argv: list[str] | None = None) -> str:
    """The command line of this run (the script's own arguments when `argv` is None)."""
    return ".venv/bin/python " + shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])


def machine() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )


def fmt(x: float | None, spec: str) -> str:
    """`format(x, spec)`, or "-" for a value that was not measured."""
    return "-" if x is None else format(x, spec)


def write_result(out: str | Path, result: dict, markdown: str) -> None:
    """`OUT.json` and `OUT.md` (parents created), and the markdown on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown.rstrip("\n") + "\n")
    print(markdown)
