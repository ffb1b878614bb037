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
        assert (
            m["longserve_prefix_cache_hit_tokens_total"] == 240
        )  # 15 blocks of 16 of the 248-byte prompt (the last token is always run)
        assert m["longserve_prefix_cache_bytes"] > 0
        assert m["vllm:request_success_total{finished_reason=length}{model_name=tiny}"] == 2


def test_cache_prefix_compresses_once_and_reuses(serve, loaded):
    llm = LLM(loaded=loaded, max_batch_size=2, prefill_chunk=64, prefix_cache="32MB")
    document = "the shared document says the door code is 4711. " * 8  # 392 bytes = tokens
    spec = {"policy": "snapkv", "budget": 64, "window": 8, "tokens": len(document)}
    with serve(llm=llm, max_model_len=512, served_model_name="tiny") as s:
        answers = []
        for question in ("q: the code?", "q: the door?"):
            body = {"prompt": document + question, "max_tokens": 4, "ignore_eos": True, "temperature": 0}
            r = s.http.post("/v1/completions", json={**body, "cache_prefix": spec})
            assert r.status_code == 200, r.text
            answers.append(r.json()["usage"])
        assert answers[0]["prompt_tokens"] == answers[1]["prompt_tokens"] == len(document) + 12
        assert answers[1]["prompt_tokens_details"]["cached_tokens"] == len(document)
        m = _metrics(s)
        assert m["longserve_prefix_cache_compressed_entries"] == 1
        assert m["longserve_prefix_cache_compressed_hits_total"] == 1
        assert m["longserve_prefix_cache_bytes"] == 64 * loaded.args.kv_bytes_per_token()


def test_bad_cache_prefix_requests_are_400(serve, loaded):
    body = {
        "prompt": "x" * 100,
        "max_tokens": 2,
        "cache_prefix": {"policy": "snapkv", "budget": 16, "window": 4, "tokens": 50},
    }
    with serve(llm=LLM(loaded=loaded, max_batch_size=2), max_model_len=512) as s:  # no prefix cache
        r = s.http.post("/v1/completions", json=body)
        assert r.status_code == 400 and "--prefix-cache-memory" in r.json()["error"]["message"]
    llm = LLM(loaded=loaded, max_batch_size=2, prefix_cache="8MB")
    with serve(llm=llm, max_model_len=512) as s:
        for bad, words in [
            ({"tokens": 100}, "must leave at least one"),
            ({"tokens": 50, "budget": 0}, "greater than or equal to 1"),
            ({"tokens": 50, "policy": "nope"}, "unknown kv policy"),
        ]:
            r = s.http.post("/v1/completions", json={**body, "cache_prefix": {**body["cache_prefix"], **bad}})
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        r = s.http.post("/v1/completions", json={**body, "kv_policy": {"name": "full"}})
        assert r.status_code == 400 and "without kv_policy" in r.json()["error"]["message"]
