"""Quest (Tang et al., 2024): query-aware page selection at decode. Keeps every token (no memory
saving) but each step reads only the `budget` tokens of the pages whose per-channel key bounds
promise the highest attention: it saves bytes read per step, not bytes held."""

from dataclasses import dataclass
from typing import ClassVar

from longserve.kv.policies.base import Policy


@dataclass
class QuestPolicy(Policy):
    name: ClassVar[str] = "quest"
    compresses: ClassVar[bool] = False
    sparse_decode: ClassVar[bool] = True
    page_size: int = 16
    window: int = 0

    def __post_init__(self) -> None:
        from longserve.errors import InvalidParameterError

        super().__post_init__()
        if self.budget is None or self.budget < self.page_size:
            raise InvalidParameterError(f"quest needs budget >= page size ({self.page_size}) tokens")

    def pages_read(self) -> int:
        return self.budget // self.page_size
