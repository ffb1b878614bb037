"""Streaming reads of safetensors checkpoints, so loading a model never holds a second copy of it.

`safetensors.load_file` returns a whole state dict next to the model it is loaded into (2x the weights at
peak), and reading through its mmap makes every touched page of the file count as resident memory too
(1.5x when fp32 files are cast to bf16 on load). Here each tensor is read with plain ``readinto`` straight
into the buffer that becomes the parameter, in the target dtype; a tensor stored in another dtype is read
through one reusable chunk of at most `CHUNK_BYTES` and cast chunk by chunk. Peak memory is the model plus
one chunk. The header is checked against the file size first, so a truncated file is an error naming it,
not a short read deep inside torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from longserve.errors import CorruptModelError

#: safetensors dtype codes this reader understands (all a causal LM checkpoint uses).
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
#: Largest staging buffer used to cast a tensor stored in another dtype (bounds the peak above the model).
CHUNK_BYTES = 4 << 20
#: A header larger than this is not a real safetensors header (the format itself caps it at 100 MB).
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, stored dtype and shape, and the absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupt(path: Path, why: str, hint: str) -> CorruptModelError:
    return CorruptModelError(f"cannot read {path.name} ({why}); {hint}")


def read_index(path: Path, hint: str) -> dict[str, TensorEntry]:
    """Tensor name -> entry for one safetensors file, validated against the file's size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(MAX_HEADER, size - 8):
                raise _corrupt(path, "no safetensors header: the file is truncated or not safetensors", hint)
            header = json.loads(f.read(n))
    except OSError as exc:
        raise _corrupt(path, exc.strerror or str(exc), hint) from None
    except (ValueError, UnicodeDecodeError):
        raise _corrupt(path, "its safetensors header is not valid JSON", hint) from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its safetensors header is not a JSON object", hint)
    base, out = 8 + n, {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(
                path, f"tensor {name!r} has a malformed or unsupported header entry", hint
            ) from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise _corrupt(path, f"tensor {name!r}: {end - begin} bytes for shape {list(shape)}", hint)
        if base + end > size:
            raise _corrupt(path, f"truncated: tensor {name!r} ends past the end of the file", hint)
        out[name] = TensorEntry(path, dtype, shape, base + begin, nbytes)
    return out


def _fill(f: BinaryIO, dest: torch.Tensor, path: Path, hint: str) -> None:
    """Read exactly ``dest.nbytes`` bytes from ``f`` into the (contiguous) tensor ``dest``."""
    view = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise _corrupt(path, "truncated while reading tensor data", hint)
        done += got


def read_tensor(
    f: BinaryIO, entry: TensorEntry, out: torch.Tensor, staging: torch.Tensor | None, hint: str
) -> None:
    """Read ``entry`` into the contiguous CPU tensor ``out`` (its dtype may differ from the file's: then
    through ``staging``, a flat buffer of the file's dtype, chunk by chunk). ``f`` is ``entry.file``."""
    if entry.numel == 0:
        return
    f.seek(entry.start)
    if out.dtype == entry.dtype:
        _fill(f, out, entry.file, hint)
        return
    flat = out.view(-1)
    per = staging.numel()
    for i in range(0, entry.numel, per):
        n = min(per, entry.numel - i)
        _fill(f, staging[:n], entry.file, hint)
        flat[i : i + n].copy_(staging[:n])


def read_into(entries: dict[str, TensorEntry], dest: dict[str, torch.Tensor], hint: str) -> None:
    """Fill each tensor of ``dest`` (key -> contiguous CPU tensor, possibly a view into a larger one) from
    its entry, file by file in offset order. One staging buffer per stored dtype serves every cast, so
    casting adds at most `CHUNK_BYTES` and no allocator churn (freed buffers fragment the heap)."""
    staging: dict[torch.dtype, torch.Tensor] = {}
    for key, out in dest.items():
        entry = entries[key]
        if out.dtype != entry.dtype and entry.dtype not in staging:
            per = max(1, CHUNK_BYTES // entry.dtype.itemsize)
            largest = max(e.numel for k, e in entries.items() if k in dest and e.dtype == entry.dtype)
            staging[entry.dtype] = torch.empty(min(per, largest), dtype=entry.dtype)
    by_file: dict[Path, list[str]] = {}
    for key in dest:
        by_file.setdefault(entries[key].file, []).append(key)
    for path, keys in by_file.items():
        try:
            with path.open("rb", buffering=0) as f:
                for key in sorted(keys, key=lambda k: entries[k].start):  # sequential reads
                    entry = entries[key]
                    read_tensor(f, entry, dest[key], staging.get(entry.dtype), hint)
        except OSError as exc:
            raise _corrupt(path, exc.strerror or str(exc), hint) from None
