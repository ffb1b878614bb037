"""What a slot does with a new decode token once its cache is full: one small class per behaviour.

A policy declares its strategy as a class attribute (`decode: ClassVar[DecodeStrategy] = RING`); the
pool asks the strategy where the token goes and attention never looks at which one it is. Adding a
decode behaviour is one class here (or in the policy's own file), not an edit of the pool or the
attention backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from longserve.kv.cache import SlotState

#: `full_slot_entry` result: each layer and KV head picks its own victim from the accumulated scores.
BY_SCORE = -1


@dataclass(frozen=True)
class DecodeStrategy:
    name: ClassVar[str] = "base"
    fixed_size: ClassVar[bool] = True  # a slot is sized by the budget (static shape) rather than grown
    accumulates_scores: ClassVar[bool] = False  # the pool keeps per-entry attention mass (H2O, TOVA)

    def full_slot_entry(self, state: SlotState) -> int | None:
        """Entry the next token overwrites in a full slot (advancing the strategy's own cursor in
        `state`, a scratch copy the pool commits later); `BY_SCORE`; or None: it cannot take one."""
        return None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Append(DecodeStrategy):
    """The cache grows by one token per step: capacity = kept prompt + max_new_tokens."""

    name: ClassVar[str] = "append"
    fixed_size: ClassVar[bool] = False


@dataclass(frozen=True)
class Ring(DecodeStrategy):
    """A fixed-size cache whose new tokens overwrite the oldest token of the recent region, so a
    sequence never holds more than its budget (StreamingLLM, SAGE-KV, SnapStream)."""

    name: ClassVar[str] = "ring"

    def full_slot_entry(self, state: SlotState) -> int | None:
        span = state.limit - state.protected
        if span <= 0:
            return None
        entry = state.protected + state.ring_next % span
        state.ring_next += 1
        return entry


@dataclass(frozen=True)
class EvictLowest(DecodeStrategy):
    """A fixed-size cache where each new token replaces the lowest-scored old one outside the
    recent window (H2O); the scores are the attention each entry has received so far."""

    name: ClassVar[str] = "evict"
    accumulates_scores: ClassVar[bool] = True

    def full_slot_entry(self, state: SlotState) -> int | None:
        return BY_SCORE


APPEND, RING, EVICT = Append(), Ring(), EvictLowest()
