"""What speculative prefill hands the target (`CompressedPrompt`) and the tokenizer helpers both the
compression and the generation side use."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from longserve.llm import LLM
from longserve.specprefill import prompt as P

Prompt = P.Prompt
_SPLIT = "\u2063LONGSERVE_SPLIT\u2063"


@dataclass
class CompressedPrompt:
    """What the target gets: `prompt` (text or messages) for the cross-tokenizer path; `ids` + `positions`
    (original position ids of the kept tokens) for the same-tokenizer path. Token counts are the target's."""

    prompt: Prompt
    original_tokens: int
    kept_tokens: int
    path: str  # "same_tokenizer", "cross_tokenizer" or "passthrough"
    ids: list[int] | None = None
    positions: list[int] | None = None
    draft_tokens: int = 0
    draft_kept: int = 0
    content_ratio: float | None = None  # cross path: kept / original target tokens of the compressible text
    within_tolerance: bool = True
    score_s: float = 0.0  # draft forward (prefill + look-ahead)
    compress_s: float = 0.0  # everything: rendering, scoring, selection, re-tokenization
    windows: int = 0

    @property
    def ratio(self) -> float:
        return self.kept_tokens / max(1, self.original_tokens)

    @property
    def text(self) -> str | None:
        return self.prompt if isinstance(self.prompt, str) else None

    @property
    def messages(self) -> list[dict] | None:
        return self.prompt if isinstance(self.prompt, list) else None

    def stats(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("prompt", "ids", "positions")}
        out["ratio"] = self.ratio
        return out


def tokenizer_of(x):
    """The tokenizer of an LLM, or `x` itself when it is one."""
    return x.tokenizer if isinstance(x, LLM) else x


def same_tokenizer(a, b) -> bool:
    """Whether token ids mean the same text under both tokenizers (vocab + a probe encoding)."""
    if a is b:
        return True
    get_a, get_b = getattr(a, "get_vocab", None), getattr(b, "get_vocab", None)
    if callable(get_a) and callable(get_b):
        if get_a() != get_b():
            return False
    elif type(a) is not type(b):
        return False
    probe = "Hello, world! 12345 <tag> naïve\n\tdef f(x): return x"
    return list(a.encode(probe, add_special_tokens=True)) == list(b.encode(probe, add_special_tokens=True))


def encode_for(target: LLM, prompt: Prompt) -> list[int]:
    """Token ids the target runs for `prompt` (template-less models get the server's plain chat format)."""
    if isinstance(prompt, list) and not getattr(target.tokenizer, "chat_template", None):
        return list(target.tokenizer.encode(P.plain_chat(prompt), add_special_tokens=True))
    return target.encode(prompt)


def split_prompt(tokenizer, context: str, question: str) -> tuple[list[int], list[int]]:
    """Ids of (everything up to the end of `context`, the rest) for a prompt reading `context + question`:
    one user turn with a chat template, raw text without one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + _SPLIT + question}],
            add_generation_prompt=True,
            tokenize=False,
        )
        add_special = False
    else:
        text, add_special = context + _SPLIT + question, True
    head, tail = text.split(_SPLIT)
    return (
        list(tokenizer.encode(head, add_special_tokens=add_special)),
        list(tokenizer.encode(tail, add_special_tokens=False)),
    )


def with_stats(stats: dict, cp: CompressedPrompt) -> dict:
    """A target sequence's stats with the compression's: `ttft_s` becomes end-to-end (compression included)."""
    out = dict(stats)
    out["target_ttft_s"] = stats.get("ttft_s")
    if stats.get("ttft_s") is not None:
        out["ttft_s"] = stats["ttft_s"] + cp.compress_s
    out["spec_prefill"] = cp.stats()
    return out
