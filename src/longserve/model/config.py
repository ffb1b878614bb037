"""Architecture facts read once from a Hugging Face config, so the model code has no `if family` maze."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longserve.errors import ModelNotFoundError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    max_position: int
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    gemma_style: bool = False  # (1 + w) norms, sqrt(d) embedding scale, sandwich norms, tanh-GELU
    scaling: float = 0.0
    final_softcap: float | None = None
    layer_windows: tuple[int | None, ...] = ()  # sliding window per layer, None = global attention
    layer_rope: tuple[str, ...] = ()  # which inverse-frequency table each layer uses

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes one cached token costs across all layers (K and V)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize

    @classmethod
    def from_hf(cls, cfg) -> ModelArgs:
        cfg = getattr(cfg, "text_config", None) or cfg
        model_type = cfg.model_type.removesuffix("_text")
        if model_type not in SUPPORTED_FAMILIES:
            raise ModelNotFoundError(
                f"model type '{cfg.model_type}' is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        n = cfg.num_hidden_layers
        layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
        window = getattr(cfg, "sliding_window", None)
        if model_type == "mistral" and window:
            layer_types = ["sliding_attention"] * n
        if not getattr(cfg, "use_sliding_window", True):
            layer_types = ["full_attention"] * n
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        gemma = model_type == "gemma3"
        rope_params = cfg.rope_parameters or {}
        per_type = isinstance(next(iter(rope_params.values()), None), dict)
        layer_rope = tuple(t if per_type else "default" for t in layer_types)
        scaling = (cfg.query_pre_attn_scalar if gemma else head_dim) ** -0.5
        if getattr(cfg, "attn_logit_softcapping", None):
            raise ModelNotFoundError("attention logit soft-capping (Gemma 2) is not supported")
        return cls(
            family=model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            n_layers=n,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            rms_eps=cfg.rms_norm_eps,
            max_position=cfg.max_position_embeddings,
            qkv_bias=bool(getattr(cfg, "attention_bias", False)) or model_type == "qwen2",
            qk_norm=model_type in ("qwen3", "gemma3"),
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            gemma_style=gemma,
            scaling=scaling,
            final_softcap=getattr(cfg, "final_logit_softcapping", None),
            layer_windows=windows,
            layer_rope=layer_rope,
        )


def rope_tables(cfg, args: ModelArgs) -> dict[str, tuple[torch.Tensor, float]]:
    """Inverse frequencies (and attention scaling) per RoPE kind, via transformers' own init functions
    so that llama3 / yarn / linear scaling stay exactly as the checkpoint expects."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = getattr(cfg, "text_config", None) or cfg
    tables = {}
    for kind in sorted(set(args.layer_rope)):
        params = cfg.rope_parameters[kind] if kind != "default" else cfg.rope_parameters
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params["rope_theta"]
            dim = args.head_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            tables[kind] = (inv_freq, 1.0)
        else:
            layer_type = kind if kind != "default" else None
            tables[kind] = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, layer_type=layer_type)
    return tables
