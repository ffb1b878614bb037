"""Policy registry: adding a policy = one file + one line here."""

from __future__ import annotations

from longserve.errors import InvalidParameterError
from longserve.kv.policies.adakv import AdaKVPolicy
from longserve.kv.policies.base import Policy, ScoreInputs, ScoringChunk
from longserve.kv.policies.expected_attention import ExpectedAttentionPolicy
from longserve.kv.policies.full import FullPolicy
from longserve.kv.policies.h2o import H2OPolicy
from longserve.kv.policies.knorm import KNormPolicy
from longserve.kv.policies.kvzip import KVzipPolicy
from longserve.kv.policies.layer_budgets import LayerBudgetPolicy
from longserve.kv.policies.quest import QuestPolicy
from longserve.kv.policies.random import RandomPolicy
from longserve.kv.policies.sage import SagePolicy
from longserve.kv.policies.snapkv import SnapKVPolicy
from longserve.kv.policies.snapstream import SnapStreamPolicy
from longserve.kv.policies.strategy import APPEND, EVICT, RING, DecodeStrategy
from longserve.kv.policies.streaming import StreamingPolicy
from longserve.kv.policies.wrapper import PolicyWrapper

REGISTRY: dict[str, type[Policy]] = {
    "full": FullPolicy,
    "streaming": StreamingPolicy,
    "snapkv": SnapKVPolicy,
    "sage": SagePolicy,
    "snapstream": SnapStreamPolicy,
    "h2o": H2OPolicy,
    "quest": QuestPolicy,
    "knorm": KNormPolicy,
    "random": RandomPolicy,
    "kvzip": KVzipPolicy,
    "expected_attention": ExpectedAttentionPolicy,
}

#: Wrappers a keyword switches on (CLI flags, server JSON, eval specs), applied around the named policy:
#: `make_policy("snapkv", head_adaptive=True)` is `AdaKVPolicy(SnapKVPolicy())`. A wrapper's own
#: parameters (`AdaKVPolicy.options`) are taken from the same keywords.
WRAPPERS: dict[str, type[PolicyWrapper]] = {
    "head_adaptive": AdaKVPolicy,
    "layer_budgets": LayerBudgetPolicy,  # "global" / "pyramid"; "uniform" (or None) leaves it off
}

OFF = (None, False, "uniform")

#: Names for a policy + wrapper combination the literature names on its own.
ALIASES: dict[str, tuple[str, dict]] = {
    "pyramidkv": ("snapkv", {"layer_budgets": "pyramid"}),  # PyramidKV = SnapKV scores, pyramid budgets
}


def known_policies() -> list[str]:
    """Every name `make_policy` accepts: the registry's, then the aliases (for help and error texts)."""
    return [*REGISTRY, *ALIASES]


def make_policy(name: str | Policy | None = "full", **kwargs) -> Policy:
    """Build a policy by name; unknown keyword arguments and names are user errors."""
    if isinstance(name, Policy):
        return name
    if name in ALIASES:
        name, preset = ALIASES[name]
        kwargs = {**preset, **kwargs}
    wrappers = []
    for flag, wrapper in WRAPPERS.items():
        if flag in kwargs:  # switched on or off: its options are its own, never the named policy's
            on, options = kwargs.pop(flag), {k: kwargs.pop(k) for k in wrapper.options if k in kwargs}
            if on not in OFF:
                if flag in wrapper.options:  # the keyword's value is the wrapper's own setting
                    options[flag] = on
                wrappers.append((wrapper, options))
    policy = _make_named(name, kwargs)
    for wrapper, options in wrappers:
        policy = wrapper(policy, **{k: v for k, v in options.items() if v is not None})
    return policy


def _make_named(name: str | None, kwargs: dict) -> Policy:
    name = name or "full"
    if name not in REGISTRY:
        raise InvalidParameterError(f"unknown kv policy '{name}'; known: {', '.join(known_policies())}")
    cls = REGISTRY[name]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not cls.compresses and name == "full":
        kwargs.pop("budget", None)
        kwargs.pop("ratio", None)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InvalidParameterError(f"bad parameter for kv policy '{name}': {exc}") from None


__all__ = [
    "ALIASES",
    "APPEND",
    "EVICT",
    "REGISTRY",
    "RING",
    "WRAPPERS",
    "AdaKVPolicy",
    "LayerBudgetPolicy",
    "DecodeStrategy",
    "Policy",
    "PolicyWrapper",
    "ScoreInputs",
    "ScoringChunk",
    "known_policies",
    "make_policy",
]
