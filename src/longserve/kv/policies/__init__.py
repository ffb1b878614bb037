"""Policy registry: adding a policy = one file + one line here."""

from __future__ import annotations

from longserve.errors import InvalidParameterError
from longserve.kv.policies.base import Policy, ScoreInputs
from longserve.kv.policies.full import FullPolicy
from longserve.kv.policies.h2o import H2OPolicy
from longserve.kv.policies.knorm import KNormPolicy
from longserve.kv.policies.quest import QuestPolicy
from longserve.kv.policies.random import RandomPolicy
from longserve.kv.policies.sage import SagePolicy
from longserve.kv.policies.snapkv import SnapKVPolicy
from longserve.kv.policies.snapstream import SnapStreamPolicy
from longserve.kv.policies.streaming import StreamingPolicy

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
}


def make_policy(name: str | Policy | None = "full", **kwargs) -> Policy:
    """Build a policy by name; unknown keyword arguments and names are user errors."""
    if isinstance(name, Policy):
        return name
    name = name or "full"
    if name not in REGISTRY:
        raise InvalidParameterError(f"unknown kv policy '{name}'; known: {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not cls.compresses and name == "full":
        kwargs.pop("budget", None)
        kwargs.pop("ratio", None)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InvalidParameterError(f"bad parameter for kv policy '{name}': {exc}") from None


__all__ = ["REGISTRY", "Policy", "ScoreInputs", "make_policy"]
