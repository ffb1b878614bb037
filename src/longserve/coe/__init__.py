"""Composition of experts: several models behind one API under a weight budget, with tiers and a router."""

from longserve.coe.attach import AttachLoader
from longserve.coe.compose import CoE
from longserve.coe.experts import Expert, load_experts
from longserve.coe.router import Route, Router
from longserve.coe.tiers import ModelTiers, WeightBudgetError

__all__ = [
    "AttachLoader",
    "CoE",
    "Expert",
    "ModelTiers",
    "Route",
    "Router",
    "WeightBudgetError",
    "load_experts",
]
