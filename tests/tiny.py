"""Tiny random-weight models of every supported family, with a HF twin for reference checks."""

from __future__ import annotations

import torch

from longserve.loader import LoadedModel, build_model

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")


def hf_config(family: str, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common, head_dim=16)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if family == "mistral":
        return MistralConfig(**common, head_dim=16, sliding_window=None)
    if family == "gemma3":
        common["num_hidden_layers"] = overrides.get("num_hidden_layers", 4)
        return Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=24,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"][
                : common["num_hidden_layers"]
            ],
        )
    raise ValueError(family)


def hf_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF initialises norms to neutral values; randomise them so bugs show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


class ByteTokenizer:
    """Enough of a tokenizer for the engine: ids are bytes + a few specials."""

    eos_token_id = 256
    bos_token = None
    chat_template = None
    unk_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def convert_tokens_to_ids(self, token):
        return None

    def token_bytes(self) -> list[bytes]:
        """Every id's bytes, for grammar-constrained decoding (`longserve.engine.grammar`)."""
        return [bytes([i]) for i in range(256)] + [b"</s>"]


def tiny_loaded(family: str = "llama", seed: int = 0, **overrides) -> tuple[LoadedModel, object]:
    """(our model loaded with the weights of a random HF model, that HF model)."""
    ref = hf_model(family, seed, **overrides)
    ours = build_model(ref.config)
    missing, _ = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not [m for m in missing if m != "lm_head.weight"], missing
    ours.eval().fuse()
    loaded = LoadedModel(
        f"tiny-{family}", None, ours, ByteTokenizer(), ours.args, (ByteTokenizer.eos_token_id,)
    )
    return loaded, ref
