"""Turn a zoo name, an HF directory or a GGUF file into (our model, tokenizer, facts about it)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from longserve.errors import CorruptModelError
from longserve.model import CausalLM, ModelArgs
from longserve.model.config import rope_tables

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: CausalLM
    tokenizer: object
    args: ModelArgs
    eos_ids: tuple[int, ...]

    @property
    def context_window(self) -> int:
        return self.args.max_position


def build_model(hf_config, dtype: torch.dtype = torch.float32) -> CausalLM:
    """An untrained model from a HF config (tests use this with tiny random configs)."""
    args = ModelArgs.from_hf(hf_config)
    return CausalLM(args, rope_tables(hf_config, args)).to(dtype)


def load_state(model: CausalLM, path: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CorruptModelError(
            f"no *.safetensors weights in {path}; re-pull the model (`longserve models pull NAME --force`)"
        )
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise CorruptModelError(
                f"cannot read {f.name} ({exc}); re-pull with `longserve models pull NAME --force`"
            ) from None
    state = {
        k.removeprefix("model.language_model.").removeprefix("language_model."): v for k, v in state.items()
    }
    state = {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape: the config and the weights disagree
        raise CorruptModelError(f"weights in {path} do not fit its config.json: {exc}") from None
    if model.args.tie_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing:
        raise CorruptModelError(
            f"weights in {path} lack {len(missing)} tensors ({_some(missing)}); re-pull the model"
        )
    unexpected = [k for k in unexpected if not _IGNORED_KEYS.search(k)]
    if unexpected:
        raise CorruptModelError(
            f"weights in {path} hold {len(unexpected)} tensors that belong to no part of this "
            f"{model.args.family} model ({_some(unexpected)}); they are for another architecture or corrupt"
        )


#: Tensors a checkpoint may carry that we deliberately do not load: the vision/projector towers of a
#: multimodal checkpoint (only its text decoder is served) and RoPE frequencies (rebuilt from the config).
_IGNORED_KEYS = re.compile(r"(^|\.)(vision_tower|multi_modal_projector)\.|(^|\.)rotary_emb\.inv_freq$")


def _some(keys: list[str], shown: int = 5) -> str:
    """A few key names for an error message, so a 300-key list stays one readable line."""
    more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(sorted(keys)[:shown]) + more


def eos_ids(path: Path, tokenizer, hf_config) -> tuple[int, ...]:
    ids = set()
    for source in (hf_config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    gen = path / "generation_config.json"
    if gen.exists():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
            ids.add(token_id)
    return tuple(sorted(ids))


def load(name_or_path: str, dtype: str = "float32", progress: bool = True) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    from longserve import zoo

    path = zoo.resolve(name_or_path, progress=progress)
    try:
        hf_config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CorruptModelError(f"cannot read config/tokenizer in {path}: {exc}") from None
    model = build_model(hf_config, DTYPES[dtype])
    load_state(model, path)
    model.eval().fuse()
    return LoadedModel(name_or_path, path, model, tokenizer, model.args, eos_ids(path, tokenizer, hf_config))
