"""Save a distilled draft as an HF-format directory registered in the local zoo cache.

The directory (config.json and tokenizer files copied from the original draft, model.safetensors with
the new weights, a `longserve.json` manifest) is built in a temp dir and renamed into
`zoo.home()/models/<name>/` by the zoo's own atomic builder, so `zoo.resolve(name)` and
`longserve generate --draft <name>` find it like any pulled model.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from longserve import zoo
from longserve.errors import InvalidParameterError
from longserve.model import CausalLM

_SKIP = (zoo.MANIFEST, zoo.WEIGHTS, "model.safetensors.index.json", "pytorch_model.bin")


def check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise InvalidParameterError(f"model name {name!r} must be letters, digits, '.', '_' or '-' (no '/')")
    if name in zoo.ZOO:
        raise InvalidParameterError(
            f"{name!r} is a zoo model's name; pick another name for the distilled draft"
        )


def export_model(
    model: CausalLM,
    name: str,
    source_dir: str | Path | None,
    hf_config=None,
    *,
    source: dict | None = None,
    force: bool = True,
) -> Path:
    """Write `model`'s weights with the draft's config/tokenizer files; returns the zoo directory.

    `source_dir`: the original draft's directory (config.json, tokenizer files). Without one (tests'
    in-memory models) `hf_config` supplies config.json and no tokenizer files are written.
    """
    from safetensors.torch import save_file

    check_name(name)
    if source_dir is None and hf_config is None:
        raise InvalidParameterError("export needs the draft's directory or its HF config")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        state.pop("lm_head.weight", None)  # HF re-ties it on load; safetensors rejects shared storage

    def make(out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        if source_dir is not None:
            for f in sorted(Path(source_dir).iterdir()):
                if f.is_file() and f.name not in _SKIP and not f.name.endswith((".gguf", ".safetensors")):
                    shutil.copy2(f, out / f.name)
        if not (out / "config.json").exists():
            hf_config.save_pretrained(out)
        save_file(state, str(out / zoo.WEIGHTS), metadata={"format": "pt"})

    info = {"kind": "distilled", **(source or {})}
    return zoo.build(name, info, make, force=force)
