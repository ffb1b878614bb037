"""How well a draft serves a target: greedy speculative decoding over a prompt set, fixed k."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from longserve.distill.teacher import as_prompt
from longserve.llm import LLM
from longserve.spec import SpeculativeDecoder


def acceptance(
    target: LLM,
    draft: LLM,
    prompts: list[str],
    max_new_tokens: int = 64,
    k: int = 4,
    progress: bool = False,
    desc: str = "acceptance",
) -> dict:
    """Pooled acceptance rate (accepted / proposed drafts), mean accepted drafts per round, target
    forwards per generated token, over greedy generations with a fixed k (comparable across drafts)."""
    dec = SpeculativeDecoder(target, draft, k=k, adaptive=False)
    proposed = accepted = rounds = forwards = tokens = 0
    start = time.perf_counter()
    for text in tqdm(prompts, disable=not progress, desc=desc, unit="prompt"):
        s = dec.generate(as_prompt(target, text), max_new_tokens=max_new_tokens).stats
        proposed += s["draft_tokens_proposed"]
        accepted += s["draft_tokens_accepted"]
        rounds += s["verify_rounds"]
        forwards += s["target_forward_passes"]
        tokens += s["completion_tokens"]
    return {
        "prompts": len(prompts),
        "k": k,
        "acceptance_rate": accepted / proposed if proposed else None,
        "mean_accepted_length": accepted / rounds if rounds else None,
        "tokens_per_target_forward": (tokens - len(prompts)) / forwards if forwards else None,
        "draft_tokens_proposed": proposed,
        "draft_tokens_accepted": accepted,
        "completion_tokens": tokens,
        "seconds": time.perf_counter() - start,
    }
