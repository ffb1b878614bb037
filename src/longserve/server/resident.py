"""One expert in tier 0 of a several-model server: its LLM, KV plan, engine thread and server state.

A `Resident` is what `coe.ModelTiers` holds for a resident expert (the object its `load` returns): it
reports its `weight_bytes` and tears itself down in `close()`, which `ModelTiers` calls when it parks
the expert. Requests lease it from the moment they pick it until their response stream is closed, and
`close()` waits for those leases: a park never cuts off a running request, and no engine, scheduler or
KV pool outlives it (after `close()` the object holds no tensor, so dropping it frees the weights).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from types import SimpleNamespace

from longserve.coe.experts import Expert
from longserve.coe.tiers import weight_bytes
from longserve.kv.policies import Policy
from longserve.server.async_engine import AsyncEngine
from longserve.server.kv_plan import KVPlan, plan_kv
from longserve.server.metrics import Metrics
from longserve.server.serving_engine import ServerState


@dataclasses.dataclass
class ServeSettings:
    """The per-model serving options of `longserve serve` (the same for every expert)."""

    kv_policy: Policy | None = None
    max_model_len: int | None = None
    max_batch_size: int | None = None
    max_kv_memory: str | int | None = None  # for the whole server; each resident expert gets a share
    max_waiting: int | None = None
    default_max_tokens: int | None = None
    max_step_tokens: int | None = 512


@dataclasses.dataclass
class Profile:
    """What the server keeps about an expert while it is parked: enough to plan its KV pool, list it in
    /v1/models and resolve its aliases, without its weights."""

    size: int  # weight bytes, measured on the loaded tensors
    aliases: frozenset[str]
    policy: Policy
    view: SimpleNamespace  # the fields `plan_kv` reads from an LLM, without the LLM
    vocab_size: int

    @classmethod
    def of(cls, expert: Expert, llm, settings: ServeSettings) -> Profile:
        name = str(llm.loaded.name)
        loaded = SimpleNamespace(args=llm.loaded.args, context_window=llm.loaded.context_window)
        view = SimpleNamespace(
            loaded=loaded,
            context_window=llm.context_window,
            max_batch_size=llm.max_batch_size,
            dtype=llm.dtype,
        )
        policy = settings.kv_policy if settings.kv_policy is not None else llm.policy()
        aliases = frozenset({expert.name, expert.model, name, Path(name).name})
        return cls(weight_bytes(llm), aliases, policy, view, llm.loaded.args.vocab_size)

    def plan(self, settings: ServeSettings, kv_memory: str | int | None) -> KVPlan:
        return plan_kv(
            self.view,
            self.policy,
            max_model_len=settings.max_model_len,
            max_batch_size=settings.max_batch_size,
            max_kv_memory=kv_memory,
        )


class Resident:
    """An expert made ready to serve. Built on the switch thread (the load never runs on the event loop);
    the engine thread starts with the first request. `plan=None` builds it without an engine (the
    server's startup pass that measures every expert)."""

    def __init__(
        self,
        expert: Expert,
        llm,
        profile: Profile,
        plan: KVPlan | None,
        settings: ServeSettings,
        metrics: Metrics,
    ):
        self.name, self.llm, self.loaded = expert.name, llm, llm.loaded
        self.weight_bytes = profile.size
        self.metrics = metrics
        self.engine: AsyncEngine | None = None
        self.state: ServerState | None = None
        self._cond = threading.Condition()
        self.leases = 0
        self.closing = False
        if plan is not None:
            self.attach(profile, plan, settings)

    def attach(self, profile: Profile, plan: KVPlan, settings: ServeSettings) -> None:
        """Build the engine (scheduler, KV pool) and the server state for `plan`."""
        engine = self.llm.engine(plan.n_slots, plan.slot_capacity, max_step_tokens=settings.max_step_tokens)
        self.engine = AsyncEngine(engine, max_waiting=settings.max_waiting, metrics=self.metrics)
        self.state = ServerState(
            self.llm,
            self.engine,
            plan,
            profile.policy,
            self.name,
            frozenset({self.name}),
            settings.default_max_tokens,
        )

    # ---- leases (event loop) and close (switch thread) ---------------------------------------
    @property
    def ready(self) -> bool:
        return self.state is not None and not self.closing

    def lease(self) -> bool:
        """Take a lease, unless the expert is being parked (then the caller waits for a switch)."""
        with self._cond:
            if self.closing or self.state is None:
                return False
            self.leases += 1
            return True

    def release(self) -> None:
        with self._cond:
            self.leases -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """Stop new leases, wait until the held ones are released (their requests finish or are
        aborted: nothing is cut off), stop the engine thread and drop every tensor reference."""
        with self._cond:
            self.closing = True
            self._cond.wait_for(lambda: self.leases == 0)
        if self.engine is not None:
            self.engine.shutdown()
            m = self.metrics
            for gauge in (m.kv_slots, m.kv_pool_bytes, m.kv_bytes):
                gauge.set(0)
            m.load(0, 0, 0.0)
        self.llm = self.loaded = self.engine = self.state = None

    # ---- read by /health ----------------------------------------------------------------------
    def load_info(self) -> dict:
        engine = self.engine
        if engine is None:
            return {"running": 0, "waiting": 0, "free_slots": 0}
        return {
            "running": len(engine.engine.scheduler.running),
            "waiting": engine.num_waiting,
            "free_slots": engine.engine.pool.n_free,
        }

    def kv_bytes(self) -> int:
        """K/V bytes its sequences hold now (0 when idle)."""
        engine = self.engine
        if engine is None:
            return 0
        pool = engine.engine.pool
        return sum(pool.held_nbytes(s) for s, state in enumerate(pool.slots) if state is not None)
