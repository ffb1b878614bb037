"""No compression: the reference every other policy is measured against."""

from dataclasses import dataclass
from typing import ClassVar

from longserve.kv.policies.base import Policy


@dataclass
class FullPolicy(Policy):
    name: ClassVar[str] = "full"
    compresses: ClassVar[bool] = False
    window: int = 0
