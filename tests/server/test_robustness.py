"""Clients that vanish, requests that crash, and the metrics that account for all of it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

LONG = {"max_tokens": 1500, "temperature": 0, "extra_body": {"ignore_eos": True}}


def _metrics(server) -> dict[str, float]:
    """Every sample of /metrics by name (+ sorted labels), parsed with the Prometheus text parser."""
    text = server.http.get("/metrics").text
    return {
        name + "".join(f"{{{k}={v}}}" for k, v in sorted(labels.items())): value
        for family in text_string_to_metric_families(text)
        for name, labels, value, *_ in family.samples
    }


def _cancel_stream(server, i: int) -> None:
    client = server.client()
    if i % 2:
        stream = client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": f"c{i}"}], stream=True, **LONG
        )
    else:
        stream = client.completions.create(model="tiny-llama", prompt=f"cancel {i}", stream=True, **LONG)
    next(iter(stream))
    stream.close()
    client.close()


def test_100_cancelled_streams_leak_nothing(serve):
    with serve(max_model_len=2048) as s:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: _cancel_stream(s, i), range(100)))
        s.wait_idle()
        assert _metrics(s)["longserve_requests_total{finish_reason=abort}"] == 100
        assert s.client().completions.create(model="tiny-llama", prompt="after", max_tokens=3).choices


def test_non_streaming_client_disconnect_aborts(serve):
    with serve(max_model_len=2048) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                s.url + "/v1/completions",
                timeout=0.5,
                json={"prompt": "slow", "max_tokens": 2000, "ignore_eos": True},
            )
        s.wait_idle()
        assert _metrics(s)["longserve_requests_total{finish_reason=abort}"] == 1


def test_an_exception_in_one_request_fails_only_that_request(serve, monkeypatch):
    with serve(max_model_len=512) as s:
        runner = s.state.engine.engine.runner
        prefill = runner.prefill_packed

        def broken_prefill(chunks):
            if any(bytes(t for t in seq.prompt_ids if t < 256).startswith(b"POISON") for seq, _ in chunks):
                raise RuntimeError("injected failure")
            return prefill(chunks)

        monkeypatch.setattr(runner, "prefill_packed", broken_prefill)
        client = s.client()
        expected = client.completions.create(
            model="tiny-llama", prompt="healthy", max_tokens=20, temperature=0
        )

        def poisoned(stream: bool):
            if not stream:
                return client.completions.create(model="tiny-llama", prompt="POISON", max_tokens=20)
            return list(
                client.completions.create(model="tiny-llama", prompt="POISON", max_tokens=20, stream=True)
            )

        with ThreadPoolExecutor(5) as pool:
            good = [
                pool.submit(
                    client.completions.create,
                    model="tiny-llama",
                    prompt="healthy",
                    max_tokens=20,
                    temperature=0,
                )
                for _ in range(3)
            ]
            bad = [pool.submit(poisoned, stream) for stream in (False, True)]
            with pytest.raises(openai.InternalServerError, match="injected failure"):
                bad[0].result()
            with pytest.raises(openai.APIError, match="injected failure"):  # in-band SSE error event
                bad[1].result()
            assert all(g.result().choices[0].text == expected.choices[0].text for g in good)
        s.wait_idle()
        assert _metrics(s)["longserve_requests_total{finish_reason=error}"] == 2


def test_a_failing_decode_step_fails_its_batch_and_serving_continues(serve, monkeypatch):
    with serve(max_model_len=512) as s:
        runner = s.state.engine.engine.runner
        decode, calls = runner.decode, []

        def flaky_decode(seqs):
            calls.append(len(seqs))
            if len(calls) == 3:
                raise RuntimeError("decode blew up")
            return decode(seqs)

        monkeypatch.setattr(runner, "decode", flaky_decode)
        with pytest.raises(openai.InternalServerError, match="decode blew up"):
            # ignore_eos: a sampled EOS in the first tokens would end the request before the third decode
            s.client().completions.create(
                model="tiny-llama", prompt="a", max_tokens=10, extra_body={"ignore_eos": True}
            )
        s.wait_idle()
        assert (
            s.client()
            .completions.create(model="tiny-llama", prompt="b", max_tokens=10)
            .usage.completion_tokens
        )


def test_metrics_parse_and_account_for_requests(serve):
    with serve(max_model_len=256) as s:
        client = s.client()
        usages = [
            client.completions.create(model="tiny-llama", prompt=p, max_tokens=6, temperature=0).usage
            for p in ("one", "two", "three")
        ]
        list(
            client.chat.completions.create(
                model="tiny-llama",
                messages=[{"role": "user", "content": "s"}],
                max_tokens=5,
                temperature=0,
                stream=True,
            )
        )
        s.wait_idle()
        deadline = time.monotonic() + 5
        while (m := _metrics(s))["longserve_num_requests_running"] and time.monotonic() < deadline:
            time.sleep(0.01)  # gauges refresh right after the step that finished the last request
    assert m["longserve_time_to_first_token_seconds_count"] == 4
    assert m["longserve_e2e_request_latency_seconds_count"] == 4
    assert m["longserve_kv_compression_ratio_count"] == 4
    finished = sum(v for k, v in m.items() if k.startswith("longserve_requests_total"))
    assert finished == 4
    assert m["longserve_prompt_tokens_total"] >= sum(u.prompt_tokens for u in usages)
    assert m["longserve_generation_tokens_total"] >= sum(u.completion_tokens for u in usages)
    assert m["longserve_inter_token_latency_seconds_count"] == m["longserve_generation_tokens_total"] - 4
    assert m["longserve_num_requests_running"] == 0 and m["longserve_kv_cache_usage"] == 0
    assert m["longserve_kv_cache_slots"] == 4 and m["longserve_kv_cache_bytes_in_use"] == 0
