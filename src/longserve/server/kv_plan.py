"""KV memory admission: how many sequence slots the server's KV budget buys under its default policy.

The engine's pool has `n_slots` slots of one fixed `capacity` (tokens per global layer). A fixed-size
policy (ring/evict: streaming, snapstream, h2o, ...) never holds more than its budget however long the
sequence, so its slot is the budget; a growing policy (append: full, snapkv, ...) may hold the whole
`max_model_len`. The number of slots is what the memory limit allows, capped by `max_batch_size` when
one is given (else by `MAX_AUTO_SLOTS`: a memory limit alone decides the batch, so `--max-kv-memory 2GiB`
under snapstream runs every slot that fits, not a default 8), so admission is exact: a running sequence
can never run out of KV memory.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from longserve.errors import InvalidParameterError
from longserve.kv.cache import KVPool
from longserve.kv.policies import Policy
from longserve.units import SUFFIXES, human_bytes, parse_count

#: Explicit byte units keep their standard meaning; bare suffixes (`4k`, `2g`) and token counts (`64ktok`)
#: go through `longserve.units.parse_count`, where `k` is 1024 as everywhere else in longserve.
_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "tib": 1024**4,
}
_TOKEN_UNITS = ("tok", "toks", "token", "tokens")
#: Slots a memory limit may buy when no batch size is given: beyond this a decode step's attention and
#: bookkeeping grow while each sequence gets slower, so more slots stop paying for themselves.
MAX_AUTO_SLOTS = 256


@dataclass(frozen=True)
class KVMemory:
    amount: int
    unit: str  # "bytes" or "tokens"


def parse_kv_memory(value: str | int) -> KVMemory:
    """`4GiB`, `512MB`, `2147483648` or `4k` (bytes; bare `k` = 1024) or `65536tok` / `64ktok` (KV tokens over
    all slots)."""
    if isinstance(value, int):
        return KVMemory(value, "bytes")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    unit = match.group(2).lower() if match else ""
    prefix, tokens = unit, False
    for suffix in _TOKEN_UNITS:
        if unit.endswith(suffix) and unit[: -len(suffix)] in SUFFIXES:
            prefix, tokens = unit[: -len(suffix)], True
            break
    if match is None or (unit not in _BYTE_UNITS and prefix not in SUFFIXES):
        raise InvalidParameterError(f"cannot read KV memory '{value}': use e.g. 4GiB, 512MB or 65536tok")
    if unit in _BYTE_UNITS:
        return KVMemory(int(float(match.group(1)) * _BYTE_UNITS[unit]), "bytes")
    amount = parse_count(match.group(1) + prefix) if prefix else int(float(match.group(1)))
    return KVMemory(amount, "tokens" if tokens else "bytes")


def parse_byte_size(value: str | int, what: str) -> int:
    """A size in bytes (`1GiB`, `512MB`, an int) for `what` (a flag or parameter name); tokens refused."""
    size = parse_kv_memory(value)
    if size.unit != "bytes":
        raise InvalidParameterError(f"{what} takes a size in bytes (e.g. 1GiB), got {value!r}")
    return size.amount


def slot_capacity(policy: Policy, max_model_len: int) -> int:
    """Tokens one slot must hold so any admissible request under `policy` fits."""
    return policy.capacity(max_model_len, 0) if policy.decode.fixed_size else max_model_len


def slot_nbytes(loaded, capacity: int, dtype) -> int:
    """Bytes one slot occupies, measured on a one-slot pool built like the engine's, so sliding-window
    layers count as their ring (the tensors are never touched, so this costs no real memory)."""
    return KVPool(loaded.args, 1, capacity, max_tokens=loaded.context_window, dtype=dtype).slot_nbytes()


@dataclass(frozen=True)
class KVPlan:
    policy: str
    max_model_len: int
    slot_capacity: int  # tokens per slot (global layers)
    slot_bytes: int
    n_slots: int  # slots the engine is built with: min(max_batch_size, what memory allows)
    full_slot_bytes: int  # one uncompressed max_model_len sequence
    kv_memory: str | None  # the limit as given
    sequences_by_memory: int | None  # slots the limit allows under the default policy
    full_sequences_by_memory: int | None  # ... and under `full`
    slots_limited_by: str = "max_batch_size"  # what set n_slots: max_batch_size, memory, cap, default

    @property
    def pool_bytes(self) -> int:
        return self.n_slots * self.slot_bytes

    @property
    def capacity_ratio(self) -> float:
        """Sequences per byte relative to `full` (max_model_len / budget for snapstream)."""
        return self.full_slot_bytes / self.slot_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "pool_bytes": self.pool_bytes, "capacity_ratio_vs_full": self.capacity_ratio}

    def describe(self) -> str:
        """The plan in one line, printed at startup, so the batch size is never a surprise."""
        why = {
            "memory": f"all that --max-kv-memory {self.kv_memory} holds",
            "max_batch_size": "--max-batch-size"
            + (
                f"; --max-kv-memory {self.kv_memory} holds {self.sequences_by_memory}"
                if self.kv_memory
                else ""
            ),
            "cap": f"capped at {MAX_AUTO_SLOTS}; --max-kv-memory {self.kv_memory} holds "
            f"{self.sequences_by_memory}, set --max-batch-size to go higher",
            "default": "the default batch size; no --max-kv-memory or --max-batch-size given",
        }[self.slots_limited_by]
        full = (
            f"; under 'full' it would hold {self.full_sequences_by_memory}"
            if self.full_sequences_by_memory is not None and self.policy != "full"
            else ""
        )
        return (
            f"KV plan '{self.policy}': {self.n_slots} slots ({why}{full}) x {self.slot_capacity} tok "
            f"({human_bytes(self.slot_bytes)} each, {human_bytes(self.pool_bytes)} total), "
            f"{self.capacity_ratio:.1f}x the sequences of 'full' per byte | max_model_len {self.max_model_len}"
        )


def plan_kv(
    llm,
    policy: Policy,
    *,
    max_model_len: int | None = None,
    max_batch_size: int | None = None,
    max_kv_memory: str | int | None = None,
) -> KVPlan:
    """Size the engine for `llm` serving `policy` by default; raises if not even one slot fits.

    Slots: `min(max_batch_size, what max_kv_memory holds)`; with a memory limit and no `max_batch_size`,
    what the memory holds (up to `MAX_AUTO_SLOTS`); with neither, `llm.max_batch_size`."""
    window = llm.context_window
    max_model_len = max_model_len or window
    if not 0 < max_model_len <= window:
        raise InvalidParameterError(
            f"max_model_len must be in [1, {window}] (the model's context window), got {max_model_len}"
        )
    batch = max_batch_size if max_batch_size is not None else llm.max_batch_size
    if batch < 1:
        raise InvalidParameterError(f"max_batch_size must be >= 1, got {batch}")
    capacity = slot_capacity(policy, max_model_len)
    slot_b = slot_nbytes(llm.loaded, capacity, llm.dtype)
    full_b = slot_nbytes(llm.loaded, max_model_len, llm.dtype)
    fit = fit_full = None
    if max_kv_memory is not None:
        mem = parse_kv_memory(max_kv_memory)
        if mem.unit == "tokens":
            fit, fit_full = mem.amount // capacity, mem.amount // max_model_len
        else:
            fit, fit_full = mem.amount // slot_b, mem.amount // full_b
        if fit < 1:
            raise InvalidParameterError(
                f"--max-kv-memory {max_kv_memory} does not hold one sequence slot ({capacity} tokens, "
                f"{slot_b} bytes under '{policy.name}'); raise it, lower --max-model-len or use a "
                "compressing policy such as snapstream"
            )
    if fit is None:
        n_slots, limited_by = batch, "max_batch_size" if max_batch_size is not None else "default"
    elif max_batch_size is not None:
        n_slots, limited_by = min(max_batch_size, fit), "max_batch_size" if max_batch_size < fit else "memory"
    else:
        n_slots, limited_by = min(fit, MAX_AUTO_SLOTS), "cap" if fit > MAX_AUTO_SLOTS else "memory"
    return KVPlan(
        policy.name,
        max_model_len,
        capacity,
        slot_b,
        n_slots,
        full_b,
        None if max_kv_memory is None else str(max_kv_memory),
        fit,
        fit_full,
        limited_by,
    )
