"""Weight tiers under a memory budget: which experts are resident, parked or on disk.

Tier 0, resident: weights in RAM, ready to serve. Tier 1, parked: torn down, but its weight files were
just read and are hinted to the kernel to keep (`POSIX_FADV_WILLNEED`), so attaching again reads from
the page cache, not the disk. Tier 2: on disk (never loaded in this process, or long parked). An LRU
decides what stays resident; pinned experts never leave. The budget counts weight bytes as measured on
the loaded tensors (`Tensor.nbytes`, shared tensors once), so it holds exactly, not by estimate.
"""

from __future__ import annotations

import gc
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from longserve.coe.experts import Expert
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


def weight_bytes(llm) -> int:
    model = llm.loaded.model
    tensors = {t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values())


def default_load(expert: Expert):
    from longserve.llm import LLM

    return LLM(expert.model, dtype=expert.dtype, progress=False)


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

    @property
    def resident_bytes(self) -> int:
        return sum(self.sizes[name] for name in self.resident)

    def tier(self, name: str) -> int:
        return 0 if name in self.resident else 1 if name in self.parked else 2

    def expert(self, name: str) -> Expert:
        if name not in self.experts:
            raise ModelNotFoundError(f"unknown model {name!r}: this server has {', '.join(self.experts)}")
        return self.experts[name]

    def get(self, name: str):
        """The expert's LLM, made resident if it is not (parking least recently used experts)."""
        expert = self.expert(name)
        if name in self.resident:
            self.resident.move_to_end(name)
            return self.resident[name]
        start, tier = time.perf_counter(), self.tier(name)
        # an expert never loaded before has no measured size yet: make room as for the largest one seen
        parked = self._make_room(self.sizes.get(name) or max(self.sizes.values(), default=0))
        llm = self.load(expert)
        size = self.sizes[name] = weight_bytes(llm)
        if size > self.max_weight_bytes:
            del llm
            gc.collect()
            raise WeightBudgetError(
                f"expert {name!r} needs {size / 2**20:.0f} MiB of weights, more than the whole budget "
                f"({self.max_weight_bytes / 2**20:.0f} MiB, --max-weight-memory)"
            )
        parked += self._make_room(size)  # its size is known only once loaded the first time
        self.resident[name] = llm
        self.parked.discard(name)
        self.switches.append(Switch(name, tier, time.perf_counter() - start, parked))
        return llm

    def _make_room(self, need: int) -> list[str]:
        parked = []
        while self.resident and self.resident_bytes + need > self.max_weight_bytes:
            victim = next((n for n in self.resident if not self.experts[n].pinned), None)
            if victim is None:
                raise WeightBudgetError(
                    f"pinned experts hold {self.resident_bytes / 2**20:.0f} MiB; no room for "
                    f"{need / 2**20:.0f} MiB more under --max-weight-memory"
                )
            self.park(victim)
            parked.append(victim)
        return parked

    def park(self, name: str) -> None:
        """Tear the expert down; keep its weight files warm in the page cache for a fast return."""
        llm = self.resident.pop(name)
        path = getattr(getattr(llm, "loaded", None), "path", None)
        del llm
        gc.collect()
        self.parked.add(name)
        if path is not None:
            keep_in_page_cache(Path(path))

    def stats(self) -> dict:
        return {
            "resident": list(self.resident),
            "parked": sorted(self.parked),
            "resident_bytes": self.resident_bytes,
            "max_weight_bytes": self.max_weight_bytes,
            "switches": len(self.switches),
        }


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
