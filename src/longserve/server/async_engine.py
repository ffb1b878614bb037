"""The engine behind the HTTP server: one thread owns the `LLMEngine` and loops `step()`.

The engine is not thread-safe, so every mutation (add, abort, step) happens on that thread; requests
arrive through a thread-safe queue and each request's `StepOutput`s go back to its asyncio queue with
`loop.call_soon_threadsafe`. Failures are contained: an exception while handling one request fails
that request; if `step()` itself raises, the requests of that step are failed and aborted (their slots
freed) and the loop keeps serving the others.

`EngineThread` is that machinery (inbox, request table, queue limit, metrics, delivery) without the
engine; `AsyncEngine` drives the batched `LLMEngine` with it and `server.speculative.SpeculativeEngine`
a `SpeculativeDecoder`, one request at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from longserve.engine.engine import LLMEngine, StepOutput
from longserve.engine.prefix_cache import CachePrefix
from longserve.engine.sampler import SamplingParams
from longserve.engine.sequence import Sequence
from longserve.errors import LongserveError
from longserve.kv.policies import Policy
from longserve.server.errors import APIError, QueueFullError, RequestFailedError
from longserve.server.metrics import Metrics

log = logging.getLogger(__name__)
_CLOSED = object()  # wakes a reader whose stream was closed under it


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    policy: Policy
    loop: asyncio.AbstractEventLoop
    positions: list[int] | None = None  # original position ids of a pruned (speculative prefill) prompt
    cache_prefix: CachePrefix | None = None  # the prompt's start to compress once and reuse
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    waiting: bool = True  # counted against max_waiting until it holds a KV slot
    admitted_at: float | None = None  # when it took a KV slot
    last_token_at: float | None = None


class RequestStream:
    """The async iterator of one request's outputs; `close()` aborts it unless it finished.

    Closing is idempotent and safe from any code path (a generator `finally`, a response background
    task), so a client that goes away at any moment frees its KV slot."""

    def __init__(self, engine: EngineThread, request: _Request):
        self._engine, self._request, self._done = engine, request, False

    @property
    def request_id(self) -> str:
        return self._request.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._request.queue.get()
        if item is _CLOSED:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._engine._send(("abort", self._request.request_id))
            self._request.queue.put_nowait(_CLOSED)


class EngineThread:
    """One thread that owns a (non-thread-safe) engine; any thread submits and aborts through an inbox.

    Subclasses implement `_run` (the loop), `_add` (accept a request), `_abort_in_engine` and
    `_refresh_gauges`; outputs go through `_on_output`, failures through `_fail`."""

    thread_name = "longserve-engine"

    def __init__(self, *, max_waiting: int | None = None, metrics: Metrics | None = None):
        self.max_waiting = max_waiting
        self.metrics = metrics or Metrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}  # engine thread only
        self._lock = threading.Lock()
        self._n_waiting = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._service_s: float | None = None  # moving average of admission -> finish, for Retry-After

    # ---- any thread ----------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._n_waiting

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
                self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._send(("stop", None))
        self._thread.join(timeout)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        policy: Policy,
        request_id: str,
        positions: list[int] | None = None,
        arrival: float | None = None,
        cache_prefix: CachePrefix | None = None,
    ) -> RequestStream:
        """Queue a request (raises `QueueFullError` at once if too many wait); iterate the result.
        `positions`: original position ids of a pruned prompt; `arrival`: when the HTTP request came in
        (TTFT then includes tokenization and prompt compression; default: now)."""
        if self._stopping:
            raise APIError("the server is shutting down", status_code=503, error_type="server_error")
        self.start()
        loop = asyncio.get_running_loop()
        request = _Request(request_id, prompt_ids, params, policy, loop, positions, cache_prefix)
        if arrival is not None:
            request.arrival = arrival
        with self._lock:
            # requests about to take a free slot are not queued behind anything
            queued = self._n_waiting - self._free_slots()
            if self.max_waiting is not None and queued >= self.max_waiting:
                raise QueueFullError(queued, self.retry_after_s(queued))
            self._n_waiting += 1
        self._send(("add", request))
        return RequestStream(self, request)

    def retry_after_s(self, queued: int) -> int:
        """Seconds until a new request would likely get a slot: the queue ahead of it, served
        `_n_slots()` at a time at the recent time per request (before any request has finished, the
        running requests' token budgets at the recent step time; 1 s when nothing is known yet)."""
        service = self._service_s if self._service_s is not None else self.cold_service_s()
        if service is None:
            return 1
        return max(1, min(3600, math.ceil(service * (queued + 1) / max(1, self._n_slots()))))

    def cold_service_s(self) -> float | None:
        """A request's service time guessed before any has finished (a burst at a fresh server)."""
        return None

    def _free_slots(self) -> int:
        """KV slots free right now (read from any thread: an estimate, for admission control)."""
        return 0

    def _n_slots(self) -> int:
        return 1

    def _send(self, command: tuple) -> None:
        self._inbox.put(command)

    def _not_waiting(self, request: _Request, admitted: bool = False) -> None:
        """The request left the queue: it took a slot (`admitted`), or it was aborted or failed."""
        with self._lock:
            if request.waiting:
                request.waiting = False
                self._n_waiting -= 1
                if admitted:
                    request.admitted_at = time.perf_counter()
                    self.metrics.admitted(request.admitted_at - request.arrival)

    # ---- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        raise NotImplementedError

    def _add(self, request: _Request) -> None:
        raise NotImplementedError

    def _abort_in_engine(self, request_id: str) -> None:
        raise NotImplementedError

    def _refresh_gauges(self) -> None:
        pass

    def _fail_all(self, exc: BaseException) -> None:
        for request in list(self._requests.values()):
            self._fail(request, exc)

    def _drain(self, block: bool) -> None:
        try:
            command = self._inbox.get(block=block)
            while True:
                self._handle(*command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, kind: str, payload) -> None:
        if kind == "stop":
            self._stopping = True
        elif kind == "add":
            self._add(payload)
        elif kind == "abort":
            request = self._requests.pop(payload, None)
            if request is not None:
                self._not_waiting(request)
                self._abort_in_engine(payload)
                self.metrics.ended("abort")

    def _on_output(self, request: _Request, out: StepOutput) -> None:
        seq, m = out.seq, self.metrics
        now = seq.token_times[-1]
        if request.last_token_at is None:
            prefill_s = now - request.admitted_at if request.admitted_at is not None else None
            m.first_token(now - request.arrival, prefill_s, seq.prompt_len)
        m.token(now - request.last_token_at if request.last_token_at is not None else None)
        request.last_token_at = now
        if out.finished:
            self._requests.pop(request.request_id, None)
            m.finished(seq.finished_at - request.arrival, seq.finished_at - seq.token_times[0], seq.stats())
            if request.admitted_at is not None:
                served = seq.finished_at - request.admitted_at
                old = self._service_s
                self._service_s = served if old is None else 0.8 * old + 0.2 * served
        self._deliver(request, out)

    def _fail(self, request: _Request, exc: BaseException) -> None:
        self._requests.pop(request.request_id, None)
        self._not_waiting(request)
        self._abort_in_engine(request.request_id)
        self.metrics.ended("error")
        self._deliver(request, exc if isinstance(exc, LongserveError) else RequestFailedError(exc))

    @staticmethod
    def _deliver(request: _Request, item: StepOutput | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the client's event loop is gone: nobody listens
            request.loop.call_soon_threadsafe(request.queue.put_nowait, item)


class AsyncEngine(EngineThread):
    """The batched `LLMEngine` (continuous batching) behind the server."""

    def __init__(self, engine: LLMEngine, *, max_waiting: int | None = None, metrics: Metrics | None = None):
        super().__init__(max_waiting=max_waiting, metrics=metrics)
        self.engine = engine
        self.metrics.kv_slots.set(engine.pool.n_slots)
        self.metrics.kv_pool_bytes.set(engine.pool.n_slots * engine.pool.slot_nbytes())
        self.max_running_seen = 0  # high-water mark of sequences holding a slot at once
        self.step_s: float | None = None  # moving average of a step's wall time
        engine.scheduler.on_admit = self._admitted

    def _free_slots(self) -> int:
        return self.engine.pool.n_free

    def cold_service_s(self) -> float | None:
        """Step time x the mean token budget of the running requests (read from any thread: the
        scheduler's list is copied, the budgets never change)."""
        running = list(self.engine.scheduler.running)
        if self.step_s is None or not running:
            return None
        return self.step_s * sum(s.params.max_new_tokens for s in running) / len(running)

    def _n_slots(self) -> int:
        return self.engine.pool.n_slots

    def _admitted(self, seq: Sequence) -> None:
        """A queued request took a KV slot: it no longer counts against `max_waiting`."""
        self.max_running_seen = max(self.max_running_seen, len(self.engine.scheduler.running))
        request = self._requests.get(seq.request_id)
        if request is not None and request.waiting:
            self._not_waiting(request, admitted=True)

    # ---- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            try:
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished() and not self._stopping:
                    self._step()
                self._refresh_gauges()
            except Exception:  # a bug here must not strand every client: log it and keep serving
                log.exception("engine loop error")
                time.sleep(0.01)
        self._fail_all(APIError("the server is shutting down", status_code=503, error_type="server_error"))

    def _add(self, request: _Request) -> None:
        self._requests[request.request_id] = request
        try:
            seq = self.engine.add_request(
                request.prompt_ids,
                request.params,
                request.policy,
                request_id=request.request_id,
                positions=request.positions,
                cache_prefix=request.cache_prefix,
            )
            seq.arrival = request.arrival  # TTFT counts the time spent in our queue too
        except Exception as exc:  # a bad request must not stop the loop
            self._fail(request, exc)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
            took = time.perf_counter() - start
            self.step_s = took if self.step_s is None else 0.9 * self.step_s + 0.1 * took
        except Exception as exc:
            step = self.engine.last_step
            seqs = step.seqs if step is not None else list(self.engine.scheduler.running)
            log.exception("engine step failed; failing %d request(s)", len(seqs))
            for seq in seqs:
                request = self._requests.get(seq.request_id)
                if request is not None:
                    self._fail(request, exc)
                else:
                    self._abort_in_engine(seq.request_id)
            return
        for out in outputs:
            request = self._requests.get(out.seq.request_id)
            if request is None:
                continue
            try:
                self._on_output(request, out)
            except Exception as exc:
                log.exception("request %s failed", request.request_id)
                self._fail(request, exc)

    def _abort_in_engine(self, request_id: str) -> None:
        """Abort, and if the engine is in a state where that raises, at least never schedule it again
        (a sequence that keeps failing every step would otherwise take the whole server down)."""
        try:
            self.engine.abort(request_id)
        except Exception:
            log.exception("abort of %s failed", request_id)
            scheduler = self.engine.scheduler
            for seq in [*scheduler.running, *scheduler.waiting]:
                if seq.request_id == request_id:
                    scheduler.finish(seq)

    def _refresh_gauges(self) -> None:
        pool, m = self.engine.pool, self.metrics
        m.load(len(self.engine.scheduler.running), self._n_waiting, 1 - pool.n_free / pool.n_slots)
        m.kv_bytes.set(sum(pool.held_nbytes(s) for s, state in enumerate(pool.slots) if state is not None))
