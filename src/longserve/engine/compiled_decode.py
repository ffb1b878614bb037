"""A `torch.compile`d decode step with static shapes, gpt-fast style (issue 18, part 4).

A slot's physical capacity is fixed when the pool is built, so a decode step can have static shapes
whatever the policy's decode strategy: attention always reads `limit` entries of the slot (a validity
mask hides the ones not written yet) and the plan's varying parts (write index, valid lengths,
positions) are tensors copied into buffers the compiled graph reads.

- Fixed-size (ring) policies (`snapstream`, `streaming`, `sage`): `limit` is the budget.
- Append policies (`full`, and the compressing ones that append after the prompt: `snapkv`, `knorm`...):
  `limit` is the slot's whole capacity, so a growing fill never changes the graph: one compile per
  generation, not one per step. The price is attention over the unwritten tail of the slot (masked).

One graph per bucket (batch size, contiguous slots, limit, pool shape, dtype), compiled on first use and
reused by every engine over the model whose pool has the same shape; inductor's FX graph cache keeps the
compiled code across processes. Since `LLM.generate` sizes a fresh pool per call (prompt + new tokens),
`pool_capacity` rounds that size up to a coarse ladder (powers of two and 1.5x between them, >= 256
tokens) when the compiler is on: calls whose prompts differ by a few tokens share a pool shape, hence a
graph, for less than half as much again (masked) KV memory and attention reads. Bucketing the read limit finer
than the capacity (by fill) would recompile mid-generation; dynamic shapes would trade that for slower
generated code. We chose the capacity: the read over the tail is cheap next to the weights at batch 1.

The eager `DecodeBackend` stays the fallback for everything `eligible` rejects (H2O's evictions chosen
from scores; Quest's page selection; head-adaptive slots): `StepCompiler.run` returns None for such a
plan and the caller runs the eager step.
"""

from __future__ import annotations

import itertools
import time
import types

import torch
import torch.nn.functional as F

from longserve.errors import InvalidParameterError
from longserve.kv.cache import KVPool
from longserve.kv.plan import DecodePlan
from longserve.model import CausalLM


def eligible(plan: DecodePlan) -> bool:
    """The one gate of the compiled step: every row writes one planned entry per layer (append or ring,
    both read `global_idx`), needs no accumulated scores (H2O's eviction reads them), no page selection
    (Quest) and keeps a per-head layout (not head-adaptive). A slot's capacity is fixed either way."""
    return (
        not plan.track_scores
        and not plan.sparse_rows
        and not plan.flat_rows
        and plan.evict_rows is None
        and plan.layer_shift is None  # per-layer budgets: each layer writes and reads at its own offset
        and not any(s.policy.decode.accumulates_scores for s in plan.states)
    )


#: The smallest pool capacity `pool_capacity` rounds to (tokens).
MIN_CAPACITY = 256


def pool_capacity(capacity: int, max_tokens: int | None = None) -> int:
    """`capacity` rounded up to the next of 256, 384, 512, 768, 1024, 1536... (powers of two and 1.5x
    between them: under 1.5x), and never past `max_tokens` (the model's window) unless
    `capacity` itself is: pools of nearby sizes get one shape, hence one compiled graph."""
    size = MIN_CAPACITY
    while size < capacity:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    if max_tokens is not None:
        size = min(size, max(capacity, max_tokens))
    return size


class StaticDecodeBackend:
    """Writes and attends like `DecodeBackend` for eligible rows, with shapes fixed per bucket: every row
    reads `limit` global entries (and the whole ring of a sliding layer) under a validity mask."""

    def __init__(self, pool: KVPool, batch: int, contiguous: bool, limit: int):
        self.pool, self.batch, self.contiguous, self.limit = pool, batch, contiguous, limit
        dev = pool.device

        def buf() -> torch.Tensor:
            return torch.zeros(batch, dtype=torch.long, device=dev)

        self.slot_index, self.positions, self.global_idx, self.global_valid, self.sliding_written = (
            buf() for _ in range(5)
        )
        self.heads = torch.arange(pool.args.n_kv_heads, device=dev)

    def load(self, plan: DecodePlan) -> None:
        """Copy one step's plan into the buffers the compiled graph reads."""
        for name in ("slot_index", "positions", "global_idx", "global_valid", "sliding_written"):
            getattr(self, name).copy_(getattr(plan, name))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool, b = self.pool, self.batch
        hq, d = q.shape[1], q.shape[3]
        hkv = k.shape[1]
        if pool.args.layer_windows[layer]:
            cap = pool.layer_capacity[layer]
            index, valid, limit = (
                self.sliding_written % cap,
                torch.clamp(self.sliding_written + 1, max=cap),
                cap,
            )
        else:
            index, valid, limit = self.global_idx, self.global_valid, self.limit
        rows = self.slot_index[:, None].expand(b, hkv)
        heads = self.heads[None, :].expand(b, hkv)
        index = index[:, None].expand(b, hkv)
        pool.k[layer].index_put_((rows, heads, index), k[:, :, 0])
        pool.v[layer].index_put_((rows, heads, index), v[:, :, 0])
        pool.pos[layer].index_put_((rows, heads, index), self.positions[:, None].expand(b, hkv))
        if self.contiguous:
            keys, values = pool.k[layer][:b, :, :limit], pool.v[layer][:b, :, :limit]
        else:
            keys = pool.k[layer][self.slot_index, :, :limit]
            values = pool.v[layer][self.slot_index, :, :limit]
        mask = (torch.arange(limit, device=q.device)[None, :] < valid[:, None])[:, None, None, :]
        qg = q.view(b, hkv, hq // hkv, d)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=pool.args.scaling)
        return out.reshape(b, hq, 1, d)


#: `LLM(compile=...)` / `--compile-mode`: name -> (torch.compile mode, inductor options).
#: "freezing" folds the weights into the graph as constants (inductor then prepacks dense GEMM weights
#: for oneDNN), so it ignores weight edits made after the first compile; "autotune" adds
#: `max-autotune-no-cudagraphs` (benchmarks kernel choices while compiling: a longer warm-up).
COMPILE_MODES: dict[str, tuple[str | None, dict | None]] = {
    "default": (None, None),
    "freezing": (None, {"freezing": True}),
    "autotune": ("max-autotune-no-cudagraphs", {"freezing": True}),
}


def compile_mode(name: str) -> tuple[str | None, dict | None]:
    """(mode, options) of a named compile mode; a one-line error for an unknown name."""
    if name not in COMPILE_MODES:
        raise InvalidParameterError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {name!r}")
    return COMPILE_MODES[name]


def own_code(fn: types.FunctionType) -> types.FunctionType:
    """`fn` with a code object of its own. Dynamo keeps its compiled graphs per code object: were every
    bucket (of every compiler in the process) a recompile of one `step` code, a lookup would check the
    guards of all of them in turn, and past `recompile_limit` dynamo silently runs the step eagerly."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_codes)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


_codes = itertools.count()


class StepCompiler:
    """Compiled decode steps of one model, one per bucket, built lazily and shared by every engine
    (KV pool) over the model: a bucket's graph reads the pool through its backend, so a new pool of
    the same shapes reuses it (size pools with `pool_capacity` to make that likely). `run(pool, plan,
    ids)` -> logits, or None when the plan is not eligible or the bucket budget is spent (the caller
    runs the eager step)."""

    def __init__(
        self, model: CausalLM, max_buckets: int = 8, mode: str | None = None, options: dict | None = None
    ):
        """`mode` / `options`: passed to `torch.compile` (e.g. `options={"freezing": True}` folds the
        weights into the graph: faster GEMMs, but the graph then ignores later weight edits, which
        `check_fused` can only turn edits it sees into a recompile)."""
        if mode is not None and options:  # torch.compile takes one or the other: spell the mode out
            options, mode = {**torch._inductor.list_mode_options(mode), **options}, None
        self.model, self.max_buckets, self.mode, self.options = model, max_buckets, mode, options
        self.steps: dict[tuple, tuple[StaticDecodeBackend, object]] = {}
        self.warmup_seconds: dict[tuple, float] = {}  # first call of each bucket: trace + compile + run
        torch._inductor.config.fx_graph_cache = True

    def bucket(self, pool: KVPool, plan: DecodePlan) -> tuple | None:
        if not eligible(plan):
            return None
        limit = max(s.limit for s in plan.states)
        return len(plan.slots), plan.contiguous, limit, pool.n_slots, tuple(pool.layer_capacity), pool.dtype

    def run(self, pool: KVPool, plan: DecodePlan, ids: torch.Tensor) -> torch.Tensor | None:
        key = self.bucket(pool, plan)
        if key is None:
            return None
        first = key not in self.steps
        if first:
            if len(self.steps) >= self.max_buckets:
                return None
            backend = StaticDecodeBackend(pool, *key[:3])
            model = self.model

            def step(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                return model(ids, positions[:, None], backend)

            self.steps[key] = (
                backend,
                torch.compile(own_code(step), dynamic=False, mode=self.mode, options=self.options),
            )
        backend, step = self.steps[key]
        backend.pool = pool
        backend.load(plan)
        self.model.check_fused()
        start = time.perf_counter()
        logits = step(ids, backend.positions)
        if first:
            self.warmup_seconds[key] = time.perf_counter() - start
        return logits
