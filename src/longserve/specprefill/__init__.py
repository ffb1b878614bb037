"""Speculative prefill: a small draft model picks the prompt tokens a (larger) target needs.

`SpeculativePrefill(draft, SpecPrefillConfig(keep=0.25)).generate(target, prompt)`; see `compress` for the
same-tokenizer (original position ids) and cross-tokenizer (text spans) paths.
"""

from longserve.specprefill.compress import (
    CompressedPrompt,
    SpeculativePrefill,
    encode_for,
    same_tokenizer,
    split_prompt,
    with_stats,
)
from longserve.specprefill.scoring import (
    Importance,
    SpecPrefillConfig,
    chunk_scores,
    select_tokens,
    token_importance,
)

__all__ = [
    "CompressedPrompt",
    "Importance",
    "SpecPrefillConfig",
    "SpeculativePrefill",
    "chunk_scores",
    "encode_for",
    "same_tokenizer",
    "select_tokens",
    "split_prompt",
    "token_importance",
    "with_stats",
]
