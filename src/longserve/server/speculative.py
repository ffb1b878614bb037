"""Speculative decoding behind the server (`longserve serve --draft MODEL`): batch 1, one request at a time.

A `SpeculativeDecoder` round is per sequence: the draft runs k decode steps in its own KV slot, the
target verifies them in one forward of k+1 tokens, then both caches roll back to the accepted prefix.
Different sequences accept different numbers of drafts per round, so their caches and positions drift
apart, and the batched engine's one-token-per-sequence decode step cannot run the rounds of several
requests together. So speculative requests do NOT join the continuous batch: one thread runs them
strictly one after another (FIFO), each with its own target slot and draft slot sized to the request,
and streams every token to the request's asyncio queue exactly like `AsyncEngine` does. What speculation
buys is latency for one stream (several tokens per target forward); under many concurrent requests the
batched engine has more throughput (requests may opt out with `"speculative": false`).

Aborts (a client that goes away) are read between tokens; a queued request is dropped from the queue.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque

from longserve.engine.sampler import SamplingParams
from longserve.errors import ContextLengthError
from longserve.server.async_engine import EngineThread, _Request
from longserve.server.errors import APIError
from longserve.server.metrics import Metrics

log = logging.getLogger(__name__)


class SpeculativeEngine(EngineThread):
    """`submit()` like `AsyncEngine`; requests run one at a time through `decoder.session(...)`."""

    thread_name = "longserve-speculative"

    def __init__(self, decoder, *, max_waiting: int | None = None, metrics: Metrics | None = None):
        super().__init__(max_waiting=max_waiting, metrics=metrics)
        self.decoder = decoder  # longserve.spec.SpeculativeDecoder
        self._pending: deque[_Request] = deque()
        self._current: _Request | None = None
        self.metrics.spec_running.set_function(lambda: self.num_running)  # read at scrape time
        self.metrics.spec_waiting.set_function(lambda: self._n_waiting)

    # ---- any thread ----------------------------------------------------------------------------
    @property
    def draft_name(self) -> str:
        return self.decoder.draft.loaded.name

    @property
    def num_running(self) -> int:
        return int(self._current is not None)

    def describe(self) -> dict:
        d = self.decoder
        return {
            "draft": self.draft_name,
            "num_draft_tokens": d.k,
            "adaptive": d.adaptive,
            "k_min": d.k_min,
            "k_max": d.k_max,
            "batch_size": 1,
        }

    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """What the decoder would refuse only once the request runs (the draft's context window)."""
        window = self.decoder.draft.context_window
        if prompt_len + params.max_new_tokens > window:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_new_tokens}) exceed the context window "
                f"of the speculative draft {self.draft_name!r} ({window} tokens); lower max_tokens or send "
                '"speculative": false'
            )

    # ---- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            try:
                self._drain(block=not self._pending)
                if self._pending and not self._stopping:
                    self._serve(self._pending.popleft())
            except Exception:  # a bug here must not strand every client: log it and keep serving
                log.exception("speculative loop error")
                time.sleep(0.01)
        self._fail_all(APIError("the server is shutting down", status_code=503, error_type="server_error"))

    def _add(self, request: _Request) -> None:
        self._requests[request.request_id] = request
        self._pending.append(request)

    def _abort_in_engine(self, request_id: str) -> None:
        # a queued request leaves the queue; the running one is stopped by `_serve` between tokens
        if any(r.request_id == request_id for r in self._pending):
            self._pending = deque(r for r in self._pending if r.request_id != request_id)

    def _serve(self, request: _Request) -> None:
        self._not_waiting(request, admitted=True)
        self._current = request
        run, recorded = None, False
        try:
            run = self.decoder.session(request.prompt_ids, request.params, request.policy)
            run.seq.arrival = request.arrival  # TTFT counts the time spent in the queue too
            for out in run:
                if self._requests.get(request.request_id) is not request:
                    break  # aborted (or failed) meanwhile
                if out.finished:  # counters first: a client that reads /metrics after its answer sees them
                    self._record(run)
                    recorded = True
                self._on_output(request, out)
                if out.finished:
                    break
                self._drain(block=False)  # aborts and new arrivals, between tokens
                if self._stopping or self._requests.get(request.request_id) is not request:
                    break
        except Exception as exc:  # one bad request must not stop the loop
            if not isinstance(exc, ContextLengthError):
                log.exception("speculative request %s failed", request.request_id)
            if self._requests.get(request.request_id) is request:
                self._fail(request, exc)
        finally:
            if run is not None:
                if not recorded:
                    self._record(run)
                self._release(run)
            self._current = None

    def _record(self, run) -> None:
        spec, m = run.seq.spec, self.metrics
        proposed, accepted, rounds = (
            spec.get(k, 0) for k in ("draft_tokens_proposed", "draft_tokens_accepted", "verify_rounds")
        )
        m.spec_draft_tokens.inc(proposed)
        m.spec_accepted_tokens.inc(accepted)
        m.spec_verify_rounds.inc(rounds)
        if rounds:
            m.spec_accepted_length.observe(accepted / rounds)

    @staticmethod
    def _release(run) -> None:
        """An unfinished run (abort, error, shutdown) frees its target and draft slots now."""
        for engine, seq in ((run.engine, run.seq), (run.draft_engine, run.draft_seq)):
            if not seq.is_finished:
                with contextlib.suppress(Exception):
                    engine.abort(seq.request_id)
