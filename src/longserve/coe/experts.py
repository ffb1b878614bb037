"""The experts a composition serves: a name, where the weights are, what the expert is for.

An experts file is TOML, one table per expert:

    [code]
    model = "qwen2.5-coder-0.5b-instruct"
    description = "Python, code review, debugging, shell commands"
    examples = ["Fix this function: def f(x): return x +", "Write a bash loop over files"]
    rules = ["```", "\\bdef\\b"]          # regexes that route to this expert outright
    dtype = "bfloat16"
    weights = "auto"                     # or "int8" / "int4" (see LLM(weights=))
    pinned = true                        # never parked
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from longserve.errors import InvalidParameterError


@dataclass
class Expert:
    name: str
    model: str  # zoo name, HF directory or .gguf
    description: str = ""
    examples: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    dtype: str = "bfloat16"
    weights: str = "auto"
    pinned: bool = False

    def __post_init__(self) -> None:
        try:
            self.patterns = [re.compile(rule, re.I) for rule in self.rules]
        except re.error as exc:
            raise InvalidParameterError(f"expert {self.name!r}: bad rule regex: {exc}") from None

    def matches(self, prompt: str) -> bool:
        return any(p.search(prompt) for p in self.patterns)

    @property
    def profile(self) -> list[str]:
        """The texts the router compares prompts with."""
        return [t for t in [self.description, *self.examples] if t]


def load_experts(path: str | Path) -> list[Expert]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidParameterError(f"experts file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidParameterError(f"{path}: not valid TOML: {exc}") from None
    experts = []
    known = set(Expert.__dataclass_fields__) - {"name"}
    for name, table in data.items():
        if not isinstance(table, dict) or "model" not in table:
            raise InvalidParameterError(f"{path}: expert {name!r} needs a table with at least model = ...")
        if unknown := set(table) - known:
            raise InvalidParameterError(f"{path}: expert {name!r} has unknown keys {sorted(unknown)}")
        experts.append(Expert(name, **table))
    if not experts:
        raise InvalidParameterError(f"{path} defines no experts")
    return experts
