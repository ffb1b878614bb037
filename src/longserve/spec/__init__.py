"""Speculative decoding (draft proposes, target verifies) with exact KV rollback under every policy."""

from longserve.spec.accept import greedy_accept, stochastic_accept
from longserve.spec.decode import (
    SpeculativeDecoder,
    TokenizerMismatchError,
    check_same_tokenizer,
    format_stats,
)
from longserve.spec.rollback import SpeculativeSlot

__all__ = [
    "SpeculativeDecoder",
    "SpeculativeSlot",
    "TokenizerMismatchError",
    "check_same_tokenizer",
    "format_stats",
    "greedy_accept",
    "stochastic_accept",
]
