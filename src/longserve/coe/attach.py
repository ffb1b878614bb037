"""Tier 1 without reloading: a model's weights kept as a file of exactly their in-memory layout, mapped
back zero-copy.

The zoo's checkpoints are fp32 safetensors in Hugging Face's layout, so loading one means reading it,
casting to bf16 and laying q/k/v and gate/up out as fused blocks (seconds for a 0.5B model). The first
time an expert is loaded, `AttachLoader` does that once and writes the result as a *flat file*: every
distinct tensor storage of the model's state dict (fused blocks, a tied embedding once, int8/int4 packs
and scales), back to back, page-aligned, after a small JSON header. From then on the expert's weights are
that file, mapped private (`UntypedStorage.from_file`, copy-on-write, never written) and assigned to a
model built on the meta device (`load_state_dict(assign=True)`): no read, no cast, no copy.

- Resident (tier 0): the mapping's pages are the weights and count in the process's RSS once touched.
- Parked (tier 1): the model and mapping are dropped; the pages stay in the kernel's page cache (no
  longer this process's RSS), so the next attach maps them again without touching the disk.
- The tokenizer and HF config of an expert are kept across parks: re-reading a tokenizer costs 1.5-6 s
  (Gemma's 262k vocabulary) for 70-260 MiB of memory, which is runtime baseline, not weights.

Flat files live in a private temporary directory of the loader (removed when the loader goes away or
the process exits), so a file is never read by another process or version of the code.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from longserve.coe.experts import Expert
from longserve.coe.memory import release_memory
from longserve.errors import CorruptModelError, InvalidParameterError

PAGE = 4096
MAGIC = b"LSFLAT01"


def _aligned(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def write_flat(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state``'s distinct storages once each, page-aligned, with a header that places every key
    in them (dtype, shape, stride, element offset): views that shared a storage in memory (fused q/k/v
    parts, tied embeddings) share it again when mapped back."""
    storages: dict[int, torch.UntypedStorage] = {}
    for t in state.values():
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
    index, offset = {}, 0
    for ptr, storage in storages.items():
        index[ptr] = (offset, storage.nbytes())
        offset = _aligned(offset + storage.nbytes())
    keys = {
        k: {
            "storage": index[t.untyped_storage().data_ptr()][0],
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "offset": t.storage_offset(),
        }
        for k, t in state.items()
    }
    header = json.dumps({"keys": keys, "bytes": offset}).encode()
    base = _aligned(len(MAGIC) + 8 + len(header))
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(MAGIC + len(header).to_bytes(8, "little") + header)
        for ptr, storage in storages.items():
            f.seek(base + index[ptr][0])
            if storage.nbytes():  # a model on a GPU is written from a host copy, one storage at a time
                host = storage if storage.device.type == "cpu" else storage.cpu()
                f.write(memoryview(torch.empty(0, dtype=torch.uint8).set_(host).numpy()))
        f.truncate(base + offset)
    tmp.replace(path)  # a file is complete or absent, never half-written


def read_flat(path: Path) -> dict[str, torch.Tensor]:
    """The state dict `write_flat` wrote, as views of one private mapping of ``path`` (zero-copy: the
    pages come from the page cache when they are there)."""
    with path.open("rb") as f:
        head = f.read(len(MAGIC) + 8)
        n = int.from_bytes(head[len(MAGIC) :], "little")
        try:
            if head[: len(MAGIC)] != MAGIC:
                raise ValueError("no flat-file magic")
            header = json.loads(f.read(n))
        except ValueError:
            raise CorruptModelError(f"{path} is not a longserve flat weights file (or is damaged)") from None
    base = _aligned(len(MAGIC) + 8 + n)
    size = path.stat().st_size
    if size < base + header.get("bytes", 0):
        raise CorruptModelError(
            f"{path} is truncated: {size} bytes, its header says {base + header['bytes']}"
        )
    mapped = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    state = {}
    for key, e in header["keys"].items():
        dtype = getattr(torch, e["dtype"])
        start = base + e["storage"]  # page-aligned: a whole number of elements of any dtype
        view = torch.empty(0, dtype=dtype).set_(
            mapped, start // dtype.itemsize + e["offset"], e["shape"], e["stride"]
        )
        state[key] = view
    return state


@dataclass
class _Attachable:
    """What re-attaching an expert needs besides its flat file: kept across parks (small)."""

    file: Path
    name: str
    path: Path  # the model's own directory (config, tokenizer), as `LoadedModel.path`
    hf_config: object
    tokenizer: object
    eos_ids: tuple[int, ...]
    dtype: str
    weights: str


class AttachLoader:
    """``load(expert)`` for `ModelTiers`: the first call loads the model from its checkpoint (tier 2)
    and writes its flat file; every call returns an `LLM` whose weights are a mapping of that file.

    ``directory``: where the flat files go (default: a new private directory under the system's
    temporary directory, removed with the loader, so the loader must outlive the LLMs it made). Files
    are keyed by (model, dtype, weights). ``llm_options`` go to every `LLM` it makes
    (``max_batch_size=``, ``prefill_chunk=``, ``kv_policy=``, ``threads=``...).
    """

    def __init__(self, directory: str | Path | None = None, **llm_options):
        if taken := sorted(llm_options.keys() & {"model", "loaded", "dtype", "weights", "progress"}):
            raise InvalidParameterError(
                f"AttachLoader sets {', '.join(taken)} itself (dtype and weights come from each Expert)"
            )
        self.llm_options = llm_options
        self._dir = Path(directory) if directory is not None else None
        self._owned: Path | None = None
        self.entries: dict[tuple[str, str, str], _Attachable] = {}
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path:
        if self._dir is None:
            self._owned = self._dir = Path(tempfile.mkdtemp(prefix="longserve-tier1-"))
            weakref.finalize(self, shutil.rmtree, self._owned, True)
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir

    def __call__(self, expert: Expert):
        key = (expert.model, expert.dtype, expert.weights)
        with self._lock:  # one loader may serve several ModelTiers: convert each model once
            if key not in self.entries:
                self.entries[key] = self._convert(expert, len(self.entries))
                release_memory()  # the loaded copy is garbage now (fused weights hold reference cycles)
            entry = self.entries[key]
        return attach(entry, **self.llm_options)

    def _convert(self, expert: Expert, n: int) -> _Attachable:
        """Load from the checkpoint once (read, cast, fuse, quantize) and keep the result as a file."""
        from transformers import AutoConfig

        from longserve.llm import LLM

        llm = LLM(
            expert.model, dtype=expert.dtype, weights=expert.weights, progress=False, **self.llm_options
        )
        loaded = llm.loaded
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(expert.model).name)
        file = self.directory / f"{n}-{safe}-{expert.dtype}-{llm.weights}.flat"
        write_flat(loaded.model.state_dict(), file)
        dtype = next(k for k, v in _dtypes().items() if v == llm.dtype)
        return _Attachable(
            file,
            loaded.name,
            loaded.path,
            AutoConfig.from_pretrained(loaded.path),
            loaded.tokenizer,
            loaded.eos_ids,
            dtype,
            llm.weights,
        )


def _dtypes() -> dict[str, torch.dtype]:
    from longserve.loader import DTYPES

    return DTYPES


def attach(entry: _Attachable, **llm_options):
    """An `LLM` over the expert's flat file: the model is built on the meta device (quantized modules
    too, when the file holds int8/int4 packs) and takes the mapped tensors by assignment."""
    from longserve.llm import LLM
    from longserve.loader import LoadedModel, empty_model
    from longserve.model.quant import QUANTIZED, quantize_head, quantize_layer

    dtype = _dtypes()[entry.dtype]
    model = empty_model(entry.hf_config, dtype)
    if entry.weights in QUANTIZED:
        with torch.device("meta"):  # the quantized modules' shapes and dtypes, no data
            for layer in model.model.layers:
                quantize_layer(layer, entry.weights, dtype)
            quantize_head(model, entry.weights)
    model.load_state_dict(read_flat(entry.file), strict=True, assign=True)
    if model.args.tie_embeddings and entry.weights not in QUANTIZED:
        model.lm_head.weight = model.model.embed_tokens.weight  # one Parameter again, as loaded
    model.eval()
    if entry.weights not in QUANTIZED:
        model.fuse()  # the parts are back-to-back views of one mapped block: fusing copies nothing
    loaded = LoadedModel(
        entry.name, entry.path, model, entry.tokenizer, model.args, entry.eos_ids, weights_file=entry.file
    )
    llm = LLM(loaded=loaded, dtype=entry.dtype, progress=False, **llm_options)
    llm.weights = entry.weights  # already quantized: LLM(loaded=, weights=int8) would quantize again
    return llm
