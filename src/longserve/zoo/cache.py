"""The local cache of converted models: where they live, their manifests, verification and the atomic
builder every pull, import and distilled-draft export goes through.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from longserve.errors import CorruptModelError, LongserveError, ModelNotFoundError, PullError
from longserve.zoo.catalogue import ZOO

#: Bump when the layout of a converted directory changes; older entries then count as corrupt.
FORMAT_VERSION = 1
MANIFEST = "longserve.json"
WEIGHTS = "model.safetensors"
CHUNK = 1 << 20


def home() -> Path:
    """Cache root: ``$LONGSERVE_HOME`` or ``~/.cache/longserve``."""
    env = os.environ.get("LONGSERVE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "longserve"


def model_dir(name: str) -> Path:
    """Where the converted files of a zoo model (or an imported local GGUF) live."""
    return home() / "models" / name


def pull_hint(name: str) -> str:
    """How to repair a cache entry: re-pull a zoo model, re-import a local GGUF."""
    return f"run `longserve models pull {name} --force`" if name in ZOO else "re-run with the original .gguf"


def sha256_file(path: Path) -> str:
    """Streamed sha256 (model files are gigabytes)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


#: Sidecar of (size, mtime) stamps of files whose sha256 matched the manifest, so a warm start does not
#: re-hash gigabytes; not listed in the manifest (written after it) and safe to delete.
STAMPS = ".longserve-verified.json"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_stamps(d: Path) -> dict:
    try:
        stamps = json.loads((d / STAMPS).read_text())
        return stamps if isinstance(stamps, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_stamps(d: Path, stamps: dict) -> None:
    """Atomic (tmp + rename) and best effort: a read-only cache still loads, it just hashes every time."""
    tmp = d / f"{STAMPS}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(stamps, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, d / STAMPS)
    except OSError:
        tmp.unlink(missing_ok=True)


def check_dir(d: Path, name: str, *, deep: bool = False, hashed: bool = False) -> None:
    """Raise CorruptModelError unless ``d`` is a complete converted directory matching its manifest.

    Sizes are always checked. ``hashed`` also checks the sha256 of every file whose (size, mtime) has not
    been verified before (streamed; the stamps are kept in `STAMPS`), so a flipped byte is caught on the
    next load while a warm start reads no file twice; ``deep`` re-hashes every file regardless.
    """
    hint = pull_hint(name)
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
    if not (deep or hashed):
        return
    stamps, verified = _read_stamps(d), {}
    for fname, meta in files.items():
        path = d / fname
        stamp = _stamp(path)
        known = stamps.get(fname) == {"stamp": stamp, "sha256": meta["sha256"]}
        if (deep or not known) and sha256_file(path) != meta["sha256"]:
            _write_stamps(d, verified)  # forget the stamps of files that are no longer trusted
            raise CorruptModelError(
                f"model {name!r}: {fname} fails its sha256 check in {d} (the file is corrupt); {hint}"
            )
        verified[fname] = {"stamp": stamp, "sha256": meta["sha256"]}
    if verified != stamps:
        _write_stamps(d, verified)


def verify(name: str, *, deep: bool = False, hashed: bool = False) -> None:
    """Check a pulled model's files against its manifest: sizes; with ``hashed`` the sha256 of files not
    verified at their current (size, mtime) before (what every load does); with ``deep`` the sha256 of all
    (`longserve models verify`)."""
    d = model_dir(name)
    if not d.exists():
        if name in ZOO:
            raise ModelNotFoundError(f"model {name!r} is not pulled yet; run `longserve models pull {name}`")
        raise ModelNotFoundError(f"unknown model {name!r}; known zoo models: {', '.join(ZOO)}")
    check_dir(d, name, deep=deep, hashed=hashed)


def verify_cached(name: str | None = None) -> list[tuple[str, str | None]]:
    """(name, error or None) for ``name`` or every entry under ``<home>/models``, every file re-hashed."""
    root = home() / "models"
    names = [name] if name else sorted(d.name for d in root.glob("*") if (d / MANIFEST).is_file())
    out = []
    for n in names:
        try:
            verify(n, deep=True)
            out.append((n, None))
        except ModelNotFoundError:
            raise
        except LongserveError as exc:
            out.append((n, str(exc)))
    return out


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


def progress_bar(progress: bool, **kw) -> tqdm:
    """A transient tqdm bar, off unless `progress`."""
    return tqdm(disable=not progress, leave=False, dynamic_ncols=True, **kw)


def write_manifest(d: Path, name: str, source: dict) -> None:
    """Sizes and sha256 of every file of `d`, checked by `verify`."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(d.iterdir())
        if p.is_file() and p.name not in (MANIFEST, STAMPS)
    }
    manifest = {"format": FORMAT_VERSION, "name": name, "source": source, "files": files}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    # just hashed: the first load after a pull need not hash again (a rename keeps the mtimes)
    _write_stamps(d, {f: {"stamp": _stamp(d / f), "sha256": m["sha256"]} for f, m in files.items()})


def _restore_aside(old: Path, dest: Path) -> None:
    """Put back the entry a killed re-pull moved aside (`build` swaps by two renames; a SIGKILL between
    them leaves the previous, complete entry only under the temp dir, which the sweep would delete)."""
    if old.is_dir() and not dest.exists():
        os.replace(old, dest)


def build(name: str, source: dict, make: Callable[[Path], None], *, force: bool) -> Path:
    """Produce ``model_dir(name)`` atomically: ``make(out)`` fills a temp dir that is renamed into place.

    A per-name lock serializes concurrent pulls; leftovers of killed earlier pulls of the same name are
    swept while holding it (a finished entry a killed re-pull had moved aside is put back first). Any
    failure (including KeyboardInterrupt) leaves the previous state intact; a SIGKILL leaves either the
    previous entry or the new one, never a partial one (the manifest is written before the rename).
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
            _restore_aside(stale / "old", dest)
            shutil.rmtree(stale, ignore_errors=True)
        if not force and dest.exists() and is_cached(name):  # the entry a killed re-pull moved aside
            return dest
        work = Path(tempfile.mkdtemp(prefix=f"{name}~", dir=tmp_root))
        try:
            out = work / "out"
            make(out)
            write_manifest(out, name, source)
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
            _restore_aside(work / "old", dest)  # the swap failed halfway: keep the previous entry
            shutil.rmtree(work, ignore_errors=True)
    return dest
