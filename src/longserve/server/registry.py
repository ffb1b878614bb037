"""Several models behind one server: the experts, which are resident, a lease per request, switches.

Each resident expert is a `Resident` (own LLM, engine thread, scheduler, KV pool); the weight tiers
and their LRU are `coe.ModelTiers`'s, under `--max-weight-memory` (unset: every expert resident).

- Startup loads every expert once, alone (everything else parked first, so even the first load of an
  expert of unknown size stays within the budget): that measures its weight bytes, refuses one larger
  than the budget, plans its KV pool and leaves its files in the page cache (tier 1). KV memory
  (`--max-kv-memory`) is split evenly over the most experts that can be resident at once (as many of
  the smallest as the budget holds), so the KV pools of the resident experts never add up to more.
- A request picks its expert (its `model`, an alias, or `auto`: the `coe.Router`'s rules, then the
  nearest expert profile, a resident expert winning near-ties) and leases it until its response stream
  is closed. An expert that is not resident is switched in by a task of its own on one dedicated
  thread: never on the event loop (/health answers during a switch), one switch at a time, and a client
  that goes away while it waits withdraws without cancelling the switch others wait for.
- Parking (`Resident.close`, called by `ModelTiers`) waits for the expert's leases: running requests
  finish, they are never cut off, and a busy expert is not skipped as a victim either. The LRU counts
  every lease as a use, so the least recently used expert is rarely busy; when it is, the switch waits
  for its requests (bounded by their max_tokens). Skipping busy victims would need a victim choice
  `ModelTiers` does not offer, and could park a model someone is about to use instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable

from longserve.coe.experts import Expert
from longserve.coe.router import Router
from longserve.coe.tiers import ModelTiers, WeightBudgetError
from longserve.errors import InvalidParameterError
from longserve.server.errors import APIError
from longserve.server.kv_plan import KVPlan, parse_kv_memory
from longserve.server.metrics import Metrics, MultiModelMetrics
from longserve.server.resident import Profile, Resident, ServeSettings
from longserve.server.routing import Lease, PromptRouter, wait_or_disconnect
from longserve.units import human_bytes

UNLIMITED = 1 << 62  # no --max-weight-memory: every expert resident


class ModelRegistry:
    """`build(expert) -> LLM` makes an expert's LLM (the CLI: `LLM(expert.model, ...)`; tests: tiny
    random models). `default_model`: the expert for requests without `model` (a name, an alias or
    "auto"; default: the first expert)."""

    def __init__(
        self,
        experts: list[Expert],
        build: Callable[[Expert], object],
        *,
        max_weight_memory: int | None = None,
        settings: ServeSettings | None = None,
        default_model: str | None = None,
        margin: float = 0.02,
    ):
        if not experts:
            raise InvalidParameterError("serving needs at least one model")
        self.experts = {e.name: e for e in experts}
        self.build, self.settings = build, settings or ServeSettings()
        self.budget = max_weight_memory
        self.tiers = ModelTiers(experts, max_weight_memory or UNLIMITED, self._load)
        self.profiles: dict[str, Profile] = {}
        self.plans: dict[str, KVPlan] = {}
        self.metrics = {e.name: Metrics(model_name=e.name) for e in experts}
        self.coe_metrics = MultiModelMetrics(self.metrics)
        self.residents: dict[str, Resident] = {}  # the tiers' resident set, as the event loop sees it
        self.last_used: dict[str, float] = {}
        self.waiting: dict[str, int] = dict.fromkeys(self.experts, 0)  # requests waiting for a switch
        self.default_model = default_model or experts[0].name
        self.margin, self.router = margin, PromptRouter(self, None, None)
        self.max_resident = len(experts)
        self.kv_share: str | int | None = None
        self._switching: dict[str, asyncio.Task] = {}
        self._lock: asyncio.Lock | None = None  # made on the event loop, when the first switch runs
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="longserve-switch")
        self.started = False

    # ---- startup (blocking, before the server listens) ---------------------------------------
    def start(self) -> None:
        names = list(self.experts)
        for name in names:  # measure each alone: never above the budget, even for an unknown size
            if self.budget is not None:
                self._park_all()
            self.tiers.get(name)
        sizes = {n: self.profiles[n].size for n in names}
        self.max_resident = self._max_resident(sizes)
        self.kv_share = self._kv_share(self.settings.max_kv_memory, self.max_resident)
        self.plans = {n: self.profiles[n].plan(self.settings, self.kv_share) for n in names}
        self._check_pinned(sizes)
        self.default_model = self.resolve(self.default_model) if self.default_model != "auto" else "auto"
        if self.budget is not None:
            self._park_all()
            for name in self._initial(sizes):
                self.tiers.get(name)
        for name, resident in self.tiers.resident.items():
            if resident.engine is None:  # measured before the plans were known
                resident.attach(self.profiles[name], self.plans[name], self.settings)
        self._sync()
        self.router = PromptRouter(self, *self._make_router())
        self.started = True

    def _load(self, expert: Expert) -> Resident:
        """`ModelTiers`'s loader (the switch thread, or startup): the LLM, measured once, served once
        the plans are known."""
        llm = self.build(expert)
        if expert.name not in self.profiles:
            self.profiles[expert.name] = Profile.of(expert, llm, self.settings)
        profile = self.profiles[expert.name]
        plan = self.plans.get(expert.name)
        return Resident(expert, llm, profile, plan, self.settings, self.metrics[expert.name])

    def _park_all(self) -> None:
        for name in list(self.tiers.resident):
            self.tiers.park(name)

    def _max_resident(self, sizes: dict[str, int]) -> int:
        if self.budget is None:
            return len(sizes)
        count, total = 0, 0
        for size in sorted(sizes.values()):
            if total + size > self.budget:
                break
            count, total = count + 1, total + size
        return max(count, 1)

    @staticmethod
    def _kv_share(max_kv_memory: str | int | None, n: int) -> str | int | None:
        """Each resident expert's share of --max-kv-memory (bytes, or tokens for a `...tok` limit)."""
        if max_kv_memory is None:
            return None
        mem = parse_kv_memory(max_kv_memory)
        return mem.amount // n if mem.unit == "bytes" else f"{mem.amount // n}tok"

    def _check_pinned(self, sizes: dict[str, int]) -> None:
        pinned = sum(sizes[n] for n, e in self.experts.items() if e.pinned)
        others = [sizes[n] for n, e in self.experts.items() if not e.pinned]
        if self.budget is not None and pinned + max(others, default=0) > self.budget:
            raise WeightBudgetError(
                f"--max-weight-memory {human_bytes(self.budget)} does not hold the pinned experts "
                f"({human_bytes(pinned)}) plus the largest other one ({human_bytes(max(others, default=0))})"
            )

    def _initial(self, sizes: dict[str, int]) -> list[str]:
        """Resident at startup: pinned experts, the default one, then the rest in order while they fit."""
        first = [n for n, e in self.experts.items() if e.pinned]
        if self.default_model in self.experts and self.default_model not in first:
            first.append(self.default_model)
        order = first + [n for n in self.experts if n not in first]
        chosen, total = [], 0
        for name in order:
            if total + sizes[name] <= self.budget:
                chosen.append(name)
                total += sizes[name]
        return list(reversed(chosen))  # loaded last = most recently used: the pinned and default ones

    def _make_router(self) -> tuple[str | None, Router | None]:
        """Embed with the smallest pinned expert (else the smallest one, pinned now) when the budget
        still holds it plus the largest other expert; otherwise `auto` routes by rules only."""
        if len(self.experts) < 2:
            return None, None
        sizes = {n: p.size for n, p in self.profiles.items()}
        pinned = [n for n, e in self.experts.items() if e.pinned]
        name = min(pinned or self.experts, key=sizes.get)
        if not self.experts[name].pinned:
            self.experts[name].pinned = True
            try:
                self._check_pinned(sizes)
            except WeightBudgetError:
                self.experts[name].pinned = False
                return None, None
            if name not in self.tiers.resident:
                self.tiers.get(name)  # built with its plan: the plans are known by now
                self._sync()
        embed = PromptRouter.embedder(self.tiers.resident[name].llm)
        return name, Router(list(self.experts.values()), embed, self.margin)

    # ---- requests (event loop) ---------------------------------------------------------------
    def resolve(self, model: str) -> str:
        """The expert a `model` names: its name, else an alias only one expert has; else the 404."""
        if model in self.experts:
            return model
        owners = [n for n, p in self.profiles.items() if model in p.aliases]
        if len(owners) == 1:
            return owners[0]
        raise APIError(
            f"the model '{model}' does not exist; this server serves "
            + ", ".join(f"'{n}'" for n in self.experts)
            + (" and 'auto'" if len(self.experts) > 1 else ""),
            status_code=404,
            param="model",
            code="model_not_found",
        )

    async def acquire(self, model: str | None, text: Callable[[], str | None], request=None) -> Lease | None:
        """A lease on the expert for this request, after switching it in if it is not resident;
        None if the client went away while it waited (it then holds nothing)."""
        expert, reason = await self.router.pick(model if model is not None else self.default_model, text)
        start, waited = time.perf_counter(), False
        self.waiting[expert] += 1
        try:
            while True:
                resident = self.residents.get(expert)
                if resident is not None and resident.lease():
                    self.last_used[expert] = time.monotonic()
                    switch_s = time.perf_counter() - start if waited else 0.0
                    return Lease(resident, expert, reason, switch_s)
                waited = True
                if not await wait_or_disconnect(self._switch_task(expert), request):
                    return None
        finally:
            self.waiting[expert] -= 1

    def _switch_task(self, name: str) -> asyncio.Task:
        task = self._switching.get(name)
        if task is None or task.done():
            task = self._switching[name] = asyncio.ensure_future(self._switch(name))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved by waiters
        return task

    async def _switch(self, name: str, park: bool = False) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            resident = self.residents.get(name)
            if not park and resident is not None and resident.ready:
                return
            before = len(self.tiers.switches)
            order = sorted(self.residents, key=lambda n: self.last_used.get(n, 0.0))
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._executor, self._switch_sync, name, order, park)
            finally:
                self._sync()
                for switch in self.tiers.switches[before:]:
                    self.coe_metrics.switched(switch.expert, switch.from_tier, switch.seconds)

    def _switch_sync(self, name: str, order: list[str], park: bool) -> None:
        """On the switch thread: tell the tiers which experts were used last (each lease is a use), then
        park or make resident (the tiers park the least recently used experts to make room)."""
        for used in order:
            if self.tiers.tier(used) == 0:
                self.tiers.get(used)  # resident: only moves it to the LRU's recent end
        if park:
            self.tiers.park(name)
            return
        resident = self.tiers.get(name)
        if resident.state is None and not resident.closing:  # measured at startup, never served yet
            resident.attach(self.profiles[name], self.plans[name], self.settings)

    async def park(self, name: str) -> None:
        """Park an expert now (a forced park: tests, operators); waits for its running requests."""
        name = self.resolve(name)
        if self.experts[name].pinned:
            raise InvalidParameterError(f"expert {name!r} is pinned: it is never parked")
        await self._switch(name, park=True)

    def _sync(self) -> None:
        """The event loop's view of the resident set (no switch runs when it is taken)."""
        self.residents = dict(self.tiers.resident)
        self.coe_metrics.refresh(self)

    # ---- state ---------------------------------------------------------------------------------
    def tier(self, name: str) -> int:
        return self.tiers.tier(name)

    def kv_bytes(self) -> int:
        """K/V bytes held by every resident expert's sequences."""
        return sum(r.kv_bytes() for r in list(self.residents.values()))

    def describe(self) -> str:
        """The startup plan, one line per expert."""
        budget = human_bytes(self.budget) if self.budget is not None else "unlimited (all resident)"
        kv = (
            f"--max-kv-memory {self.settings.max_kv_memory} split over {self.max_resident} resident "
            f"slot(s): {self.kv_share if isinstance(self.kv_share, str) else human_bytes(self.kv_share)} each"
            if self.kv_share is not None
            else "KV per expert: --max-batch-size slots (no --max-kv-memory)"
        )
        lines = [
            f"{len(self.experts)} models, weight budget {budget}, up to {self.max_resident} resident; {kv}"
        ]
        for name, expert in self.experts.items():
            tier = ("resident", "parked", "on disk")[self.tier(name)]
            extra = ", pinned" if expert.pinned else ""
            lines.append(
                f"  '{name}' ({expert.model}): {human_bytes(self.profiles[name].size)} weights, {tier}{extra}"
                f" | {self.plans[name].describe()}"
            )
        router = self.router.name
        lines.append(
            f"  default model: {self.default_model}; 'auto' routes by rules, then "
            + (f"embeddings of '{router}'" if router else "the default expert (no router: budget)")
        )
        return "\n".join(lines)

    def shutdown(self) -> None:
        """Stop every engine thread (running requests get 503, as a one-model server does)."""
        for resident in list(self.tiers.resident.values()):
            if resident.engine is not None:
                resident.engine.shutdown()
        with contextlib.suppress(Exception):
            self._executor.shutdown(wait=False, cancel_futures=True)

    def park_from_thread(self, name: str, loop: asyncio.AbstractEventLoop, timeout: float = 60) -> None:
        """`park` from outside the server's event loop (tests, a notebook)."""
        asyncio.run_coroutine_threadsafe(self.park(name), loop).result(timeout)
