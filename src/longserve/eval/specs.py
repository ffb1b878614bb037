"""Target specs of `longserve eval --policy`: `NAME[@BUDGET][:KEY=VALUE...]`, parsed into things that build
an eval `Target` for a loaded model.

Spec parsers are pluggable (`register_spec_parser`) so other kinds of targets (e.g. speculative prefill)
join the same command without the eval CLI importing them: this module imports nothing from their side.
BUDGET is in tokens (`256`, `2k` = 2048, see `longserve.units`) or, below 1, a fraction of the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from longserve.errors import InvalidParameterError
from longserve.eval.target import Target
from longserve.units import parse_count


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
        if text[-1:].isalpha():
            return parse_count(text), None
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
    """`NAME[@BUDGET][:KEY=VALUE...]` for a registered KV policy."""
    from longserve.kv.policies import known_policies

    head, *options = spec.strip().split(":")
    name, _, budget_text = head.partition("@")
    if name not in known_policies():
        known = ", ".join(known_policies())
        raise InvalidParameterError(f"unknown kv policy {name!r} in {spec!r}; known: {known}")
    budget, ratio = _budget(budget_text, spec) if budget_text else (None, None)
    kwargs = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or not key:
            raise InvalidParameterError(f"bad option {option!r} in {spec!r}: use KEY=VALUE, e.g. window=64")
        kwargs[key] = parse_value(value)
    return PolicySpec(name, budget, ratio, kwargs)


def parse_spec(spec: str) -> TargetSpec:
    """The first registered parser that owns `spec`, else the KV-policy one."""
    for parser in SPEC_PARSERS:
        parsed = parser(spec)
        if parsed is not None:
            return parsed
    return parse_policy_spec(spec)


def split_list(text: str | None) -> list[str]:
    """ "a, b,,c" -> ["a", "b", "c"] (comma-separated command-line values)."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def target_specs(
    policy: Sequence[str] = (), policies: str | None = None, budgets: str | None = None
) -> list[TargetSpec]:
    """`--policy` specs, then the `--policies x --budgets` cross product ("full" once, without a budget);
    ["full"] when nothing is given. Labels must be unique."""
    texts = list(policy)
    names, sizes = split_list(policies), split_list(budgets)
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
    """label -> target, in the order given (the reports keep that order)."""
    return {spec.label: spec.build(llm) for spec in specs}
