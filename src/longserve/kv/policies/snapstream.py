"""SnapStream: SnapKV selection at prefill into a fixed-size cache, then a ring buffer over the recent
region at decode, so every sequence keeps a static shape (what continuous batching needs)."""

from dataclasses import dataclass
from typing import ClassVar

from longserve.kv.policies.snapkv import SnapKVPolicy
from longserve.kv.policies.strategy import RING, DecodeStrategy


@dataclass
class SnapStreamPolicy(SnapKVPolicy):
    name: ClassVar[str] = "snapstream"
    decode: ClassVar[DecodeStrategy] = RING
    n_sink: int = 4
