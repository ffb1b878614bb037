"""Agentic Context Engineering: an evolving playbook grown by Generator -> Reflector -> Curator deltas."""

from longserve.ace.loop import ACE, StepRecord, accuracy, summary
from longserve.ace.playbook import Bullet, Playbook, PlaybookError, parse_operations

__all__ = [
    "ACE",
    "Bullet",
    "Playbook",
    "PlaybookError",
    "StepRecord",
    "accuracy",
    "parse_operations",
    "summary",
]
