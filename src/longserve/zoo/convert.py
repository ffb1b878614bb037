"""GGUF -> plain HF directory conversion (once per model: transformers dequantizes a GGUF on every load),
and the import of a user's local .gguf into the cache.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path

from longserve.errors import CorruptModelError, LongserveError, PullError
from longserve.zoo.cache import WEIGHTS, build, is_cached, model_dir, progress_bar, sha256_file


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars when the caller asked for quiet.

    The GGUF dequantization bar is a bare module-level ``tqdm`` that ignores transformers' switch, so it is
    swapped for a disabled one for the duration.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    if enabled:
        yield
        return
    was, bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        if was:
            hf_logging.enable_progress_bar()


#: The dtype of the converted weights. bf16 keeps 8 significant bits, far more than the 4-6 of the Q4/Q5
#: GGUF sources, at half the bytes of fp32 (disk, page cache, load time); an fp32 run casts on load.
CACHE_DTYPE = "bfloat16"


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Dequantize a GGUF once into a plain HF directory (config, bf16 safetensors, tokenizer).

    ``save_pretrained`` refuses GGUF-loaded models, so the state dict goes through safetensors directly;
    the tied ``lm_head`` is dropped (safetensors rejects shared storage, and HF re-ties it on load) and the
    ``quantization_config`` is removed so the directory loads as ordinary weights. The config names the
    architecture class and dtype (what transformers, vLLM or kvpress need to load the directory as it is)
    and a generation_config.json is always written. Writes no manifest.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    src = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name}
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, CACHE_DTYPE)
    with (
        progress_bar(progress, total=4, desc=f"convert {gguf_path.name}", unit="step") as bar,
        _hf_progress(progress),
    ):
        AutoTokenizer.from_pretrained(**src).save_pretrained(out_dir)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
        bar.update()
        config = model.config
        config.save_pretrained(out_dir)
        cfg_path = out_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg["architectures"] = [type(model).__name__]
        cfg["dtype"] = cfg["torch_dtype"] = CACHE_DTYPE  # transformers 5 reads dtype; older tools torch_dtype
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        generation = (
            model.generation_config if model.can_generate() else GenerationConfig.from_model_config(config)
        )
        generation.save_pretrained(out_dir)
        bar.update()
        # fp32 model + bf16 copy (1.5x the fp32 weights) for the few seconds of a pull, never on load
        state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
        if config.get_text_config().tie_word_embeddings:
            state.pop("lm_head.weight", None)
        del model
        save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
        bar.update()
    return out_dir


def convert_or_fail(gguf: Path, out: Path, progress: bool, error: type[LongserveError] = PullError) -> None:
    """convert_gguf, turning loader errors (unsupported arch, damaged file) into a one-line ``error``."""
    try:
        convert_gguf(gguf, out, progress=progress)
    except (LongserveError, OSError):
        raise
    except Exception as e:  # transformers raises many types for unsupported or damaged GGUFs
        first = (str(e).strip().splitlines() or [""])[0]
        raise error(
            f"converting {gguf} failed ({type(e).__name__}: {first}); "
            "it must be a llama/qwen2/gemma3-style GGUF that transformers can load"
        ) from e


def import_gguf(path: Path, progress: bool) -> Path:
    """Convert a local GGUF once, keyed by its content hash so an edited file gets a fresh entry."""
    sha = sha256_file(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "model"
    name = f"local-{stem}-{sha[:12]}"
    if is_cached(name):
        return model_dir(name)
    source = {"sha256": sha, "gguf": path.name, "path": str(path.resolve())}

    def make(out: Path) -> None:
        convert_or_fail(path, out, progress, error=CorruptModelError)

    return build(name, source, make, force=False)
