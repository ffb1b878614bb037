"""The server's prefix cache: a repeated prompt reuses its KV, counted in /metrics."""

from __future__ import annotations

from longserve.llm import LLM
from tests.server.test_robustness import _metrics


def test_a_repeated_prompt_hits_the_prefix_cache(serve, loaded):
    llm = LLM(loaded=loaded, max_batch_size=4, prefill_chunk=64, prefix_cache="32MB")
    with serve(llm=llm, max_model_len=512, served_model_name="tiny") as s:
        body = {
            "prompt": "a long shared system prompt. " * 8 + "question one",
            "max_tokens": 4,
            "ignore_eos": True,
            "temperature": 0,
        }
        first = s.http.post("/v1/completions", json=body).json()
        second = s.http.post("/v1/completions", json=body).json()
        assert first["choices"][0]["text"] == second["choices"][0]["text"]
        assert (
            first["usage"]["prompt_tokens"]
            == second["usage"]["prompt_tokens"]
            == len(body["prompt"].encode())
        )
        m = _metrics(s)
        assert m["longserve_prefix_cache_hits_total"] == 1 and m["longserve_prefix_cache_misses_total"] == 1
        assert m["longserve_prefix_cache_hit_tokens_total"] == 192  # 3 blocks of 64 of the 248-byte prompt
        assert m["longserve_prefix_cache_bytes"] > 0
        assert m["vllm:request_success_total{finished_reason=length}{model_name=tiny}"] == 2
