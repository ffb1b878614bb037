"""Tiny fast tokenizers (trained in milliseconds) and tiny random LLMs for the speculative-prefill tests.

Two BPE tokenizers with different merges and chat templates stand in for two model families, so the
cross-tokenizer path (offset mappings, re-tokenization) is covered without any download.
"""

from __future__ import annotations

import dataclasses
import functools
import random

from longserve.llm import LLM
from tests.tiny import tiny_loaded

WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "needle",
    "haystack",
    "magic",
    "number",
    "is",
    "hidden",
    "within",
    "following",
    "text",
    "remember",
    "it",
    "value",
    "key",
    "code",
    "def",
    "return",
    "print",
    "import",
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TURNS = (
    "<bos>{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", "\n"])
        for _ in range(n)
    ]


def text(n_words: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(n_words):
        out.append(rng.choice(WORDS) + (".\n" if i % 11 == 10 else ""))
    return " ".join(out)


@functools.cache
def fast_tokenizer(kind: str = "a"):
    """kind "a": byte-level BPE (vocab 300) + ChatML; kind "b": another BPE (vocab 290) + turn template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = (
        ["<|im_start|>", "<|im_end|>"] if kind == "a" else ["<bos>", "<start_of_turn>", "<end_of_turn>"]
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300 if kind == "a" else 290,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=0 if kind == "a" else 7), trainer)
    if kind == "a":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
        fast.chat_template = CHATML
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>")
        fast.chat_template = TURNS
    return fast


def tiny_llm(family: str = "llama", seed: int = 0, tokenizer=None, **overrides) -> LLM:
    """A tiny random LLM; with `tokenizer`, the vocabulary grows to fit it."""
    if tokenizer is not None:
        overrides.setdefault("vocab_size", 320)
    loaded, _ = tiny_loaded(family, seed, **overrides)
    if tokenizer is not None:
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        loaded = dataclasses.replace(loaded, tokenizer=tokenizer, eos_ids=(eos,))
    return LLM(loaded=loaded, progress=False)
