"""Test-time adaptation through context: many-shot prompting with reusable compressed demonstrations.

`make_task` builds offline, seeded tasks (or reads a JSONL file); `select`/`order` choose the
demonstrations; `ManyShot` runs a shot configuration, compressing a static block once and reusing it.
"""

from longserve.icl.datasets import GENERATED, make_task
from longserve.icl.runner import ManyShot, QueryResult, ShotConfig, ShotResult
from longserve.icl.selection import ORDERINGS, SELECTIONS, order, select
from longserve.icl.tasks import Example, Task

__all__ = [
    "GENERATED",
    "ORDERINGS",
    "SELECTIONS",
    "Example",
    "ManyShot",
    "QueryResult",
    "ShotConfig",
    "ShotResult",
    "Task",
    "make_task",
    "order",
    "select",
]
