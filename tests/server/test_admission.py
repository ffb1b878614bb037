"""Admission control of the engine thread: what counts as waiting, and an honest Retry-After."""

from __future__ import annotations

import asyncio
import math

import pytest

from longserve.engine.sampler import SamplingParams
from longserve.kv.policies import FullPolicy
from longserve.llm import LLM
from longserve.server.async_engine import AsyncEngine
from longserve.server.errors import QueueFullError


@pytest.fixture
def engine(loaded):
    llm = LLM(loaded=loaded, max_batch_size=4, prefill_chunk=64)
    engine = AsyncEngine(llm.engine(4, 600), max_waiting=1)
    yield engine
    engine.shutdown()


def test_a_burst_that_fits_the_free_slots_is_not_refused(engine):
    """Requests about to take a free slot wait for nothing: a burst of slots + max_waiting at an idle
    server is accepted (it used to get 429 for all but max_waiting of them); one more is refused."""
    params = SamplingParams(max_new_tokens=400, ignore_eos=True)

    async def burst():
        streams = [engine.submit([1, 2, 3], params, FullPolicy(), f"r{i}") for i in range(5)]
        with pytest.raises(QueueFullError) as refused:
            engine.submit([1, 2, 3], params, FullPolicy(), "r5")
        for stream in streams:
            stream.close()
        return refused.value

    err = asyncio.run(burst())
    assert err.status_code == 429 and int(err.headers["Retry-After"]) >= 1


def test_retry_after_follows_the_queue_and_recent_service_time(engine):
    engine._service_s = 6.0  # recent requests held a slot for 6 s each
    assert engine.retry_after_s(0) == 2  # one request ahead of nobody, 4 slots: 6 / 4 -> 2 s
    assert engine.retry_after_s(7) == 12  # 8 requests over 4 slots, 6 s each
    engine._service_s = None
    assert engine.retry_after_s(50) == 1


def test_a_fresh_server_estimates_retry_after_from_step_time_and_budgets(loaded):
    """Before any request has finished, Retry-After was always 1 s, so a burst at a fresh server was told
    to come back long before any slot could free; now: step time x the running requests' budgets."""
    llm = LLM(loaded=loaded, max_batch_size=1, prefill_chunk=64)
    engine = AsyncEngine(llm.engine(1, 2100), max_waiting=1)
    params = SamplingParams(max_new_tokens=2000, ignore_eos=True)

    async def run():
        first = engine.submit([1, 2, 3], params, FullPolicy(), "long")
        async for out in first:  # a few decode steps, so the step time is known
            if len(out.seq.output_ids) >= 5:
                break
        second = engine.submit([1, 2, 3], params, FullPolicy(), "queued")
        with pytest.raises(QueueFullError) as refused:
            engine.submit([1, 2, 3], params, FullPolicy(), "refused")
        estimate = engine.cold_service_s()
        first.close()
        second.close()
        return refused.value, estimate

    try:
        err, estimate = asyncio.run(run())
    finally:
        engine.shutdown()
    assert engine._service_s is None and estimate == pytest.approx(engine.step_s * 2000, rel=0.5)
    # one request queued ahead on one slot: two services of ~2000 steps each, never "1 s" (the step time
    # moves between the refusal and the estimate read here: +-1 s)
    retry_after = int(err.headers["Retry-After"])
    assert retry_after > 1 and abs(retry_after - math.ceil(2 * estimate)) <= 1
