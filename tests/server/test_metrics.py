"""Per-request series, longserve's and vLLM's names for the same events (dashboards for vLLM work)."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from longserve.engine.sampler import SamplingParams
from longserve.kv.policies import FullPolicy
from longserve.llm import LLM
from longserve.server.async_engine import AsyncEngine
from longserve.server.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render()[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_one_request_feeds_both_series(loaded):
    metrics = Metrics(model_name="tiny")
    engine = AsyncEngine(LLM(loaded=loaded).engine(2, 200), metrics=metrics)

    async def run():
        stream = engine.submit(
            list(range(5, 35)), SamplingParams(max_new_tokens=6, ignore_eos=True), FullPolicy(), "a"
        )
        return [out async for out in stream]

    try:
        outputs = asyncio.run(run())
    finally:
        engine.shutdown()
    assert outputs[-1].finished
    got, model = samples(metrics), (("model_name", "tiny"),)
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert got[(f"longserve_{name}_count", ())] == 1
        assert got[(f"vllm:{name}_count", model)] == 1
    assert (
        got[("longserve_request_prompt_tokens_sum", ())]
        == got[("vllm:request_prompt_tokens_sum", model)]
        == 30
    )
    assert got[("vllm:request_generation_tokens_sum", model)] == 6
    assert got[("vllm:generation_tokens_total", model)] == got[("longserve_generation_tokens_total", ())] == 6
    assert got[("vllm:inter_token_latency_seconds_count", model)] == 5
    assert got[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "tiny")))] == 1
    assert got[("longserve_requests_total", (("finish_reason", "length"),))] == 1
