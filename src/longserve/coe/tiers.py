"""Weight tiers under a memory budget: which experts are resident, parked or on disk.

Tier 0, resident: weights in memory, ready to serve. Tier 1, parked: torn down and its memory given back
to the kernel, but with the default loader (`longserve.coe.attach`) its converted weights stay as a flat
file in the page cache, and re-attaching maps that file again (no disk read, no conversion, no copy).
Tier 2: on disk (never loaded in this process): a full checkpoint load. An LRU decides what stays
resident; pinned experts never leave. The budget counts weight bytes as measured on the loaded tensors
(the byte ranges they occupy, shared ones once), so it holds exactly, not by estimate; a parked
expert's pages are page cache, not this process's memory, and are not counted.

The resident objects are whatever ``load(expert)`` returns (an `LLM`, or a server's per-model engine).
Two optional hooks let such an object take part in the accounting and the teardown:

- ``weight_bytes`` (attribute or property): its weight bytes, used instead of walking
  ``obj.loaded.model`` (an object that owns more than one model, or no `LLM` at all, says so itself);
- ``close()``: called by `ModelTiers.park` before the object is dropped (a server stops its engine
  loop there), so nothing keeps running on weights that no longer count against the budget.

After ``close()``, the model of an `LLM` (or of an object that wraps one as ``.llm``) is unfused, which
breaks its only reference cycles, so dropping the last reference frees it at once; a full garbage
collection (most of a second in a process holding a few tokenizers) runs only if something survived.

`ModelTiers` is safe to call from several threads. The bookkeeping is under one lock that is never
held across a load or a ``close()``, so requests for resident experts are not held up by a switch. Switches
run one at a time (a second lock): a second `get` for an expert that is being loaded waits for that load
and returns its object instead of loading twice, and two switches cannot both count the same free room.
One load at a time also costs nothing here: a load is bound by memory bandwidth, not by a core.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from longserve.coe.attach import AttachLoader
from longserve.coe.experts import Expert
from longserve.coe.memory import release_memory
from longserve.errors import InvalidParameterError, LongserveError, ModelNotFoundError


class WeightBudgetError(LongserveError):
    """An expert cannot be made resident within the weight budget."""

    status_code = 503
    error_type = "server_error"


@dataclass
class Switch:
    expert: str
    from_tier: int  # 1 parked, 2 disk
    seconds: float
    parked: list[str] = field(default_factory=list)  # made room by parking these


def weight_bytes(obj) -> int:
    """Weight bytes of a resident object: its own ``weight_bytes`` when it has one, else measured on
    ``obj.loaded.model``'s parameters and buffers as the union of the byte ranges they occupy, so tied
    weights, fused blocks and their part views, and tensors that are views of one mapped file each
    count once, and exactly (no storage slack, no file header)."""
    own = getattr(obj, "weight_bytes", None)
    if own is not None:
        return int(own() if callable(own) else own)
    model = obj.loaded.model
    ranges = sorted(
        (t.data_ptr(), t.data_ptr() + t.nbytes) for t in [*model.parameters(), *model.buffers()] if t.nbytes
    )
    total, end = 0, 0
    for start, stop in ranges:
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


#: The default ``load``: the first load of an expert reads its checkpoint and writes a flat file of its
#: converted weights; every later one (a re-attach from tier 1) maps that file (`longserve.coe.attach`).
default_load = AttachLoader()


class ModelTiers:
    def __init__(
        self, experts: list[Expert], max_weight_bytes: int, load: Callable[[Expert], object] = default_load
    ):
        if len({e.name for e in experts}) != len(experts):
            raise InvalidParameterError("expert names must be unique")
        self.experts = {e.name: e for e in experts}
        self.max_weight_bytes, self.load = max_weight_bytes, load
        self.resident: OrderedDict[str, object] = OrderedDict()  # LRU order, oldest first
        self.sizes: dict[str, int] = {}  # measured weight bytes per expert (after its first load)
        self.parked: set[str] = set()
        self.switches: list[Switch] = []
        self.loading: set[str] = set()  # the expert a switch is loading now (at most one)
        self._lock = threading.RLock()  # the bookkeeping above; never held across a load or close()
        self._switching = threading.Lock()  # one switch (park + load) at a time

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(self.sizes[name] for name in self.resident)

    def tier(self, name: str) -> int:
        with self._lock:
            return 0 if name in self.resident else 1 if name in self.parked else 2

    def expert(self, name: str) -> Expert:
        if name not in self.experts:
            raise ModelNotFoundError(f"unknown model {name!r}: this server has {', '.join(self.experts)}")
        return self.experts[name]

    def get(self, name: str):
        """The expert's resident object, made resident if it is not (parking least recently used
        experts). Blocks while another thread switches, and returns that switch's object when it loaded
        this same expert."""
        expert = self.expert(name)
        with self._lock:
            if name in self.resident:
                self.resident.move_to_end(name)
                return self.resident[name]
        with self._switching:
            with self._lock:
                if name in self.resident:  # loaded by the switch this call waited for
                    self.resident.move_to_end(name)
                    return self.resident[name]
                start, tier = time.perf_counter(), self.tier(name)
                # never loaded before: no measured size yet, so make room as for the largest one seen
                victims = self._victims(self.sizes.get(name) or max(self.sizes.values(), default=0))
                self.loading.add(name)
            obj = None
            try:
                self._close_all(victims)
                obj = self.load(expert)  # no lock held: resident experts keep serving meanwhile
                size = weight_bytes(obj)
                with self._lock:
                    self.sizes[name] = size
                    if size > self.max_weight_bytes:
                        raise WeightBudgetError(
                            f"expert {name!r} needs {size / 2**20:.0f} MiB of weights, more than the "
                            f"whole budget ({self.max_weight_bytes / 2**20:.0f} MiB, --max-weight-memory)"
                        )
                    more = self._victims(size)  # its size is known only once loaded the first time
                    self.resident[name] = obj
                    self.parked.discard(name)
                parked = [n for n, _ in victims + more]
                self._close_all(more)
                with self._lock:
                    self.switches.append(Switch(name, tier, time.perf_counter() - start, parked))
                return obj
            except BaseException:
                if obj is not None and self.resident.get(name) is not obj:  # loaded, but not kept
                    _close(obj)
                    obj = None
                    release_memory()
                raise
            finally:
                with self._lock:
                    self.loading.discard(name)

    def _victims(self, need: int) -> list[tuple[str, object]]:
        """Take LRU experts out of the resident set until ``need`` more bytes fit (the lock is held);
        the caller closes them once the lock is released."""
        out = []
        while self.resident and self.resident_bytes + need > self.max_weight_bytes:
            victim = next((n for n in self.resident if not self.experts[n].pinned), None)
            if victim is None:
                for n, obj in reversed(out):  # nothing was closed yet: put them back as they were
                    self.resident[n] = obj
                    self.resident.move_to_end(n, last=False)
                    self.parked.discard(n)
                raise WeightBudgetError(
                    f"pinned experts hold {self.resident_bytes / 2**20:.0f} MiB; no room for "
                    f"{need / 2**20:.0f} MiB more under --max-weight-memory"
                )
            out.append((victim, self.resident.pop(victim)))
            self.parked.add(victim)
        return out

    @staticmethod
    def _close_all(victims: list[tuple[str, object]]) -> None:
        """Close parked experts and free their memory for real (the lock is not held: a ``close()``
        may wait for its engine to stop). A full garbage collection runs only when something survived
        its last reference (a cycle): for an `LLM` nothing does, so a park costs milliseconds."""
        if not victims:
            return
        alive = []
        for i, (name, obj) in enumerate(victims):
            alive.append(_weak(getattr(_loaded(obj), "model", None) or obj))
            _teardown(obj)
            victims[i] = (name, None)
        del obj  # the last references go before checking what is left
        release_memory(collect=any(ref is None or ref() is not None for ref in alive))

    def park(self, name: str) -> None:
        """Tear the expert down (its ``close()`` first, when it has one); keep its weight files warm in
        the page cache for a fast return. Waits for a switch in progress."""
        self.expert(name)
        with self._switching:
            with self._lock:
                if name not in self.resident:
                    return
                victims = [(name, self.resident.pop(name))]
                self.parked.add(name)
            self._close_all(victims)

    def stats(self) -> dict:
        with self._lock:
            return {
                "resident": list(self.resident),
                "parked": sorted(self.parked),
                "loading": sorted(self.loading),
                "resident_bytes": self.resident_bytes,
                "max_weight_bytes": self.max_weight_bytes,
                "switches": len(self.switches),
            }


def _weak(obj) -> weakref.ref | None:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _loaded(obj):
    """The `LoadedModel` of an `LLM`, or of an object that wraps one as ``.llm`` (a server's engine)."""
    return getattr(obj, "loaded", None) or getattr(getattr(obj, "llm", None), "loaded", None)


def _teardown(obj) -> None:
    loaded = _loaded(obj)
    path = getattr(loaded, "weights_file", None) or getattr(loaded, "path", None)
    _close(obj)
    unfuse = getattr(getattr(loaded, "model", None), "unfuse", None)
    if callable(unfuse):  # breaks the model's only reference cycles: it is freed when dropped
        unfuse()
    if path is not None:
        keep_in_page_cache(Path(path))


def _close(obj) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        close()


def keep_in_page_cache(path: Path) -> None:
    """Ask the kernel to keep (read ahead) the weight files: re-attaching then costs no disk read."""
    if not hasattr(os, "posix_fadvise"):
        return
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
