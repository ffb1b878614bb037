"""Turn a zoo name, an HF directory or a GGUF file into (our model, tokenizer, facts about it)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from longserve.errors import CorruptModelError, InvalidParameterError
from longserve.model import CausalLM, ModelArgs
from longserve.model.checkpoint import TensorEntry, read_index, read_into
from longserve.model.config import rope_tables
from longserve.model.quant import DENSE, QUANTIZED, check_weights, quantize_head, quantize_layer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: What `--dtype` / `LLM(dtype=)` accept: a name of DTYPES, or "auto" (see `default_dtype`).
DTYPE_CHOICES = ("auto", *DTYPES)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), read from /proc/cpuinfo.

    Only then is bf16 faster than fp32 (2.5-3.5x prefill here); elsewhere PyTorch emulates bf16 through
    fp32 conversions and it is slower, so "auto" must not pick it. Not Linux / unreadable: False.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def default_dtype(device: str | torch.device | None = None) -> str:
    """The dtype "auto" means: bfloat16 where the hardware multiplies it natively (a CPU with
    AVX512-BF16/AMX, a CUDA GPU that supports it), float32 elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if native_bf16() else "float32"


def dtype_name(dtype: str, device: str | torch.device | None = None) -> str:
    """``dtype`` checked and with "auto" resolved, or InvalidParameterError naming the choices."""
    if dtype == "auto":
        return default_dtype(device)
    if dtype not in DTYPES:
        raise InvalidParameterError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    return dtype


def resolve_dtype(dtype: str) -> torch.dtype:
    return DTYPES[dtype_name(dtype)]


def dtype_and_weights(dtype: str, weights: str, device: str | torch.device | None = None) -> tuple[str, str]:
    """(compute dtype name, weights) from the two options, checked against each other.

    Dense weights live in the compute dtype, so ``weights="bf16"``/``"fp32"`` also picks the dtype when
    it is "auto" and must agree with it otherwise; int8/int4 keep activations in ``dtype`` (bf16 is their
    fast path) and run on the CPU kernels only.
    """
    check_weights(weights)
    if weights in DENSE:
        wanted = DENSE[weights]
        if dtype == "auto":
            dtype = wanted
        elif dtype_name(dtype) != wanted:
            raise InvalidParameterError(
                f"weights {weights!r} run with dtype {wanted}, not {dtype}; drop one of the two options"
            )
    dtype = dtype_name(dtype, device)
    if weights in QUANTIZED and device is not None and torch.device(device).type != "cpu":
        raise InvalidParameterError(f"weights {weights!r} run on the CPU kernels only, not on {device}")
    return dtype, weights


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: CausalLM
    tokenizer: object
    args: ModelArgs
    eos_ids: tuple[int, ...]
    #: The file the weights are mapped from, when they are a mapping (`longserve.coe.attach`), else None.
    weights_file: Path | None = None

    @property
    def context_window(self) -> int:
        return self.args.max_position


def build_model(hf_config, dtype: torch.dtype = torch.float32) -> CausalLM:
    """An untrained model from a HF config (tests use this with tiny random configs)."""
    args = ModelArgs.from_hf(hf_config)
    return CausalLM(args, rope_tables(hf_config, args)).to(dtype)


def empty_model(hf_config, dtype: torch.dtype = torch.float32) -> CausalLM:
    """The model's structure with every parameter on the meta device (no memory, no random init), for
    `load_state` to fill by assignment. The RoPE buffers are not weights: they are built from the config
    on the CPU before the meta context, so they are real, fp32 tensors from the start."""
    args = ModelArgs.from_hf(hf_config)
    rope = rope_tables(hf_config, args)
    with torch.device("meta"):
        model = CausalLM(args, rope)
    return model.to(dtype)


def load_state(
    model: CausalLM,
    path: Path,
    hint: str = "re-pull with `longserve models pull NAME --force`",
    on_layer: Callable[[int], None] | None = None,
) -> None:
    """Fill ``model`` with the safetensors weights in ``path``, each tensor read once, straight into the
    parameter's dtype (an fp32 file loads into a bf16 model without an fp32 copy of it).

    A model built by `empty_model` (meta parameters) takes the tensors by assignment, so peak memory is
    the weights plus one read chunk; a real model has them copied in (tests, re-loading a trained model).
    Refuses, with `CorruptModelError`, files that are truncated, keys that are missing or belong to no
    part of the model, and shapes that disagree with the config. With ``on_layer`` (meta models only)
    decoder layers are read one at a time and ``on_layer(i)`` runs as soon as layer ``i`` is in memory
    (int8/int4 quantization: the dense copy of the whole model never exists).
    """
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CorruptModelError(f"no *.safetensors weights in {path}; {hint}")
    entries: dict[str, TensorEntry] = {}
    for f in files:
        for key, entry in read_index(f, hint).items():
            entries[model_key(key)] = entry
    own = model.state_dict(keep_vars=True)
    tied = model.args.tie_embeddings
    missing = [k for k in own if k not in entries and not (tied and k == "lm_head.weight")]
    if missing:
        raise CorruptModelError(
            f"weights in {path} lack {len(missing)} tensors ({_some(missing)}); re-pull the model"
        )
    unexpected = [k for k in entries if k not in own and not _IGNORED_KEYS.search(k)]
    if unexpected:
        raise CorruptModelError(
            f"weights in {path} hold {len(unexpected)} tensors that belong to no part of this "
            f"{model.args.family} model ({_some(unexpected)}); they are for another architecture or corrupt"
        )
    wanted = {k: v for k, v in own.items() if k in entries and not (tied and k == "lm_head.weight")}
    for key, param in wanted.items():
        if tuple(param.shape) != entries[key].shape:
            raise CorruptModelError(
                f"weights in {path} do not fit its config.json: {key} is {list(entries[key].shape)} in the "
                f"file, {list(param.shape)} in the model"
            )
    meta = any(p.is_meta for p in own.values())
    if on_layer is not None and not meta:
        raise ValueError("on_layer needs a model built by empty_model")
    groups = [wanted] if on_layer is None else _by_layer(wanted, model.args.n_layers)
    for i, group in enumerate(groups):
        state = _destinations(model, group)
        read_into(entries, state, hint)
        model.load_state_dict(state, strict=False, assign=meta)
        del state
        if on_layer is not None and i < model.args.n_layers:
            on_layer(i)
    if tied:  # assignment replaced the embedding Parameter; the head must follow it
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a bug here, not a bad file: every key was checked above
        raise CorruptModelError(f"weights in {path} left {_some(left)} unloaded")


def _by_layer(wanted: dict[str, torch.Tensor], n_layers: int) -> list[dict[str, torch.Tensor]]:
    """``wanted`` split into one dict per decoder layer, then one for everything else (embedding, norm,
    head), in that order."""
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(n_layers + 1)]
    for key, value in wanted.items():
        parts = key.split(".")
        layer = int(parts[2]) if key.startswith("model.layers.") else n_layers
        groups[layer][key] = value
    return groups


#: Parameters that `CausalLM.fuse` concatenates, per decoder layer. Reading them straight into one
#: buffer lets the fused weight be that buffer (no concatenated copy, no freed parts left in the heap).
_FUSED_GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj"), ("weight", "bias")),
    ("mlp", ("gate_proj", "up_proj"), ("weight",)),
)


def _destinations(model: CausalLM, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An empty CPU tensor per key to read into; the parts of a fused group are row blocks of one tensor."""
    dest: dict[str, torch.Tensor] = {}
    for i in range(model.args.n_layers):
        for module, names, kinds in _FUSED_GROUPS:
            for kind in kinds:
                keys = [f"model.layers.{i}.{module}.{n}.{kind}" for n in names]
                params = [wanted.get(k) for k in keys]
                if any(p is None for p in params) or len({(p.dtype, p.shape[1:]) for p in params}) != 1:
                    continue
                rows = [p.shape[0] for p in params]
                joined = torch.empty(sum(rows), *params[0].shape[1:], dtype=params[0].dtype)
                dest.update(zip(keys, joined.split(rows), strict=True))
    for key, p in wanted.items():
        if key not in dest:
            dest[key] = torch.empty(p.shape, dtype=p.dtype)
    return dest


def model_key(key: str) -> str:
    """A checkpoint's tensor name in our model's naming (multimodal and bare-decoder layouts)."""
    key = key.removeprefix("model.language_model.").removeprefix("language_model.")
    return key if key.startswith(("model.", "lm_head.")) else f"model.{key}"


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


def load(name_or_path: str, dtype: str = "auto", progress: bool = True, weights: str = "auto") -> LoadedModel:
    """Resolve (pull/convert) and load a model; ``weights="int8"``/``"int4"`` quantizes its linears after
    the load (see `longserve.model.quant`)."""
    from transformers import AutoConfig, AutoTokenizer

    from longserve import zoo
    from longserve.zoo.cache import pull_hint

    dtype, weights = dtype_and_weights(dtype, weights)
    torch_dtype = DTYPES[dtype]
    path = zoo.resolve(name_or_path, progress=progress)
    in_zoo = path.parent == zoo.home() / "models"
    hint = pull_hint(path.name) if in_zoo else f"the files in {path} are damaged"
    try:
        hf_config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CorruptModelError(f"cannot read config/tokenizer in {path}: {exc}") from None
    model = empty_model(hf_config, torch_dtype)
    if weights in QUANTIZED:  # each layer quantized as soon as it is read: no dense copy of the model
        load_state(
            model, path, hint, on_layer=lambda i: quantize_layer(model.model.layers[i], weights, torch_dtype)
        )
        quantize_head(model, weights)
        model.eval()
    else:
        load_state(model, path, hint)
        model.eval().fuse()
    return LoadedModel(name_or_path, path, model, tokenizer, model.args, eos_ids(path, tokenizer, hf_config))
