"""Domain prompts for distillation: read from JSONL, or synthesized by the target from a description."""

from __future__ import annotations

import json
import random
from pathlib import Path

from longserve.errors import LongserveError

#: Prompts outside any particular domain: acceptance on these shows what a domain draft gave up.
GENERAL_PROMPTS = (
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about autumn leaves.",
    "What are three tips for staying focused while studying?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "Give me a recipe for a simple tomato soup.",
    "What is the difference between weather and climate?",
    "Write a polite email declining a meeting invitation.",
    "List five countries in South America and their capitals.",
    "How does a bicycle stay upright when it moves?",
    "Describe the water cycle to a ten-year-old.",
    "What should I pack for a weekend hiking trip?",
    "Translate 'good morning, how are you?' into French and Spanish.",
)


class DistillDataError(LongserveError):
    """The prompt file is empty or has malformed lines."""


def read_prompts(path: str | Path, max_errors: int = 10) -> list[str]:
    """Read `{"prompt": "..."}` lines; blank lines are skipped, every bad line is reported by number."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DistillDataError(f"cannot read prompts from {path}: {exc}") from None
    prompts, errors = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict) or "prompt" not in record:
            errors.append(f'line {number}: expected an object with a "prompt" key')
        elif not isinstance(record["prompt"], str) or not record["prompt"].strip():
            errors.append(f'line {number}: "prompt" must be a non-empty string')
        else:
            prompts.append(record["prompt"])
    if errors:
        shown = "; ".join(errors[:max_errors]) + (
            f"; ... {len(errors) - max_errors} more" if len(errors) > max_errors else ""
        )
        raise DistillDataError(
            f"{path}: {len(errors)} malformed line(s): {shown}. "
            'Each line must be a JSON object like {"prompt": "..."}'
        )
    if not prompts:
        raise DistillDataError(
            f'{path} holds no prompts; write one JSON object like {{"prompt": "..."}} per line'
        )
    return prompts


def write_prompts(path: str | Path, prompts: list[str]) -> None:
    Path(path).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")


def synthesize_prompts(
    llm,
    domain: str,
    n: int,
    seed: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    max_tries: int | None = None,
) -> list[str]:
    """Ask the target for `n` distinct user requests about `domain` (one per sampled generation)."""
    if n <= 0:
        raise DistillDataError("the number of prompts to synthesize must be >= 1")
    instruction = (
        f"Write one realistic request that a user might ask an assistant about: {domain}. "
        "Reply with the request only, no preamble."
    )
    prompt = [{"role": "user", "content": instruction}] if llm.tokenizer.chat_template else f"{instruction}\n"
    seen: dict[str, None] = {}
    tries = 0
    while len(seen) < n and tries < (max_tries or 4 * n):
        out = llm.generate(
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=0.95,
            seed=seed * 100_003 + tries,
        )[0]
        tries += 1
        text = out.text.strip().strip('"').strip()
        if len(text) >= 8:
            seen.setdefault(text, None)
    if not seen:
        raise DistillDataError(
            f"the target produced no usable prompts for domain {domain!r}; pass --prompts FILE"
        )
    return list(seen)[:n]


def split(prompts: list[str], held_out: float | int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out): a float is a fraction, an int a count; at least one prompt stays for training."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    n_held = round(held_out * len(order)) if isinstance(held_out, float) else held_out
    n_held = max(0, min(n_held, len(order) - 1))
    return order[n_held:], order[:n_held]
