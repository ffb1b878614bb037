"""CLI glue for speculative prefill, for `longserve generate`, `serve` and `eval` (wired in by `longserve.cli`).

Flags are `--prefill-draft MODEL` and `--prefill-keep F` (alias `--keep`): `--draft` already means the
speculative-decoding draft, and both features can be combined (one draft prunes the prompt, another
proposes tokens), so they need distinct names.
"""

from __future__ import annotations

import argparse

from longserve.specprefill.compress import CompressedPrompt, SpeculativePrefill
from longserve.specprefill.scoring import SpecPrefillConfig


def add_args(p: argparse.ArgumentParser, keep_alias: bool = True) -> None:
    g = p.add_argument_group(
        "speculative prefill (a small draft prunes the prompt before the target prefills it)"
    )
    g.add_argument(
        "--prefill-draft",
        metavar="MODEL",
        help="draft model that scores the prompt (zoo name, HF dir, .gguf); a draft with the target's "
        "tokenizer keeps original positions, any other works on text",
    )
    names = ["--prefill-keep", "--keep"] if keep_alias else ["--prefill-keep"]
    g.add_argument(
        *names,
        dest="prefill_keep",
        type=float,
        default=0.25,
        help="fraction of the prompt the target prefills, in (0, 1] (default 0.25)",
    )
    g.add_argument(
        "--prefill-keep-tail",
        type=int,
        default=64,
        help="last prompt tokens always kept: the question / instructions (default 64)",
    )


def from_args(args: argparse.Namespace) -> SpeculativePrefill | None:
    """The configured `SpeculativePrefill`, or None without `--prefill-draft` (validates before loading)."""
    if not getattr(args, "prefill_draft", None):
        return None
    from longserve.llm import LLM

    config = SpecPrefillConfig(keep=args.prefill_keep, keep_tail=args.prefill_keep_tail)
    draft = LLM(args.prefill_draft, dtype=getattr(args, "dtype", "float32"))
    return SpeculativePrefill(draft, config)


def summary(cp: CompressedPrompt, draft: str = "") -> str:
    """One line for stderr: what the target prefilled and what the pruning cost."""
    name = f" {draft}" if draft else ""
    if cp.path == "passthrough":
        return f"[spec prefill{name}: prompt of {cp.original_tokens} tokens passed unchanged (too short)]"
    return (
        f"[spec prefill{name}: target prefilled {cp.kept_tokens}/{cp.original_tokens} tokens "
        f"({cp.ratio:.1%}), draft scoring {cp.score_s:.2f} s, {cp.path.replace('_', ' ')}]"
    )
