"""`longserve serve --draft`: speculative decoding behind the OpenAI API (batch 1, its own worker thread)."""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import pytest

from longserve.errors import InvalidParameterError
from longserve.llm import LLM
from longserve.server import cli as server_cli
from longserve.server.app import create_app
from longserve.spec import SpeculativeDecoder
from longserve.specprefill import SpeculativePrefill
from tests.server.test_robustness import _metrics
from tests.tiny import tiny_loaded

GREEDY = {"temperature": 0, "max_tokens": 14, "extra_body": {"ignore_eos": True}}
CHAT = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture(scope="module")
def spec_server(serve, loaded):
    """Draft == target: every draft token is accepted (k=3, adaptive)."""
    target = LLM(loaded=loaded, max_batch_size=4, prefill_chunk=64)
    with serve(llm=target, speculative=SpeculativeDecoder(target, target, k=3), max_model_len=512) as s:
        yield s


def _chat(server, stream: bool = False, **extra) -> tuple[str, object]:
    client = server.client()
    body = {**GREEDY["extra_body"], **extra}
    kwargs = dict(
        model="tiny-llama", messages=CHAT, temperature=0, max_tokens=GREEDY["max_tokens"], extra_body=body
    )
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks
    r = client.chat.completions.create(**kwargs)
    return r.choices[0].message.content, r


def test_speculative_server_matches_plain_greedy_and_counts_acceptance(server, spec_server):
    client, plain = spec_server.client(), server.client()
    plain_chat, _ = _chat(server)
    text, r = _chat(spec_server)
    assert text == plain_chat and r.usage.completion_tokens == 14
    stats = r.model_extra["longserve"]
    assert stats["speculative"] is True and stats["draft_model"] == "tiny-llama"
    assert stats["draft_tokens_proposed"] > 0 and stats["acceptance_rate"] == 1.0
    assert stats["mean_accepted_length"] >= 3 and stats["target_forward_passes"] < 13
    assert _chat(spec_server, stream=True)[0] == plain_chat

    expected = plain.completions.create(model="tiny-llama", prompt="once upon", **GREEDY).choices[0].text
    assert (
        client.completions.create(model="tiny-llama", prompt="once upon", **GREEDY).choices[0].text
        == expected
    )
    streamed = list(
        client.completions.create(
            model="tiny-llama",
            prompt="once upon",
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert streamed[-1].usage.completion_tokens == 14

    spec_server.wait_idle()
    m = _metrics(spec_server)
    assert m["longserve_spec_draft_tokens_total"] > 0
    assert m["longserve_spec_accepted_tokens_total"] == m["longserve_spec_draft_tokens_total"]
    assert m["longserve_spec_verify_rounds_total"] > 0
    assert m["longserve_spec_mean_accepted_length_count"] == 4
    assert m["longserve_spec_mean_accepted_length_sum"] >= 4 * 3
    assert m["longserve_requests_total{finish_reason=length}"] == 4
    assert m["longserve_generation_tokens_total"] == 4 * 14
    assert m["longserve_spec_num_requests_running"] == 0 and m["longserve_spec_num_requests_waiting"] == 0


def test_concurrent_requests_queue_fifo_and_cancel_cleanly(server, spec_server):
    prompts = [f"prompt number {i}" for i in range(3)]
    plain = server.client()
    expected = [
        plain.completions.create(model="tiny-llama", prompt=p, **GREEDY).choices[0].text for p in prompts
    ]

    def ask(p: str) -> str:
        return spec_server.client().completions.create(model="tiny-llama", prompt=p, **GREEDY).choices[0].text

    before = _metrics(spec_server).get("longserve_requests_total{finish_reason=abort}", 0)
    stream = spec_server.client().completions.create(
        model="tiny-llama",
        prompt="cancel me",
        stream=True,
        temperature=0,
        max_tokens=480,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))  # it runs now; the others queue behind it until it is cancelled
    with ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(ask, p) for p in prompts]
        stream.close()
        assert [a.result() for a in answers] == expected
    spec_server.wait_idle()
    assert _metrics(spec_server)["longserve_requests_total{finish_reason=abort}"] == before + 1
    health = spec_server.http.get("/health").json()
    assert health["status"] == "ok" and health["speculative"]["draft"] == "tiny-llama"
    assert health["speculative"]["batch_size"] == 1 and health["running"] == 0


def test_per_request_opt_out_and_bad_speculative_field(server, spec_server):
    drafted = _metrics(spec_server)["longserve_spec_draft_tokens_total"]
    text, r = _chat(spec_server, speculative=False)
    assert text == _chat(server)[0] and "speculative" not in r.model_extra["longserve"]
    assert _metrics(spec_server)["longserve_spec_draft_tokens_total"] == drafted
    bad = server.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "speculative": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"
    assert "--draft" in bad.json()["error"]["message"]
    bad = spec_server.http.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 2, "speculative": "maybe"}
    )
    assert bad.status_code == 400


def test_penalties_and_response_format_run_on_the_batched_engine(server, spec_server):
    """The speculative decoder applies neither: such requests go to the batched sampler (or are refused
    when they insist on speculative decoding), never answered with the fields silently dropped."""
    drafted = _metrics(spec_server)["longserve_spec_draft_tokens_total"]
    text, r = _chat(spec_server, frequency_penalty=1.5)
    assert text == _chat(server, frequency_penalty=1.5)[0] != _chat(server)[0]
    assert "speculative" not in r.model_extra["longserve"]
    assert _metrics(spec_server)["longserve_spec_draft_tokens_total"] == drafted
    bad = spec_server.http.post(
        "/v1/completions",
        json={
            "prompt": "x",
            "max_tokens": 2,
            "speculative": True,
            "response_format": {"type": "json_object"},
        },
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"


def test_seeded_sampling_is_reproducible(spec_server):
    client = spec_server.client()
    sampled = [
        client.completions.create(
            model="tiny-llama", prompt="xyz", temperature=1.0, seed=7, max_tokens=8, extra_body={"top_k": 20}
        )
        for _ in range(2)
    ]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text
    assert sampled[0].model_extra["longserve"]["speculative"] is True


def test_a_smaller_draft_with_partial_acceptance_keeps_greedy_output(serve, server, loaded):
    draft = LLM(loaded=tiny_loaded("llama", seed=1, num_hidden_layers=1)[0])
    target = LLM(loaded=loaded, max_batch_size=2, prefill_chunk=64)
    expected = (
        server.client().completions.create(model="tiny-llama", prompt="abcdef", **GREEDY).choices[0].text
    )
    with serve(llm=target, speculative=SpeculativeDecoder(target, draft, k=2), max_model_len=256) as s:
        r = s.client().completions.create(model="tiny-llama", prompt="abcdef", **GREEDY)
        assert r.choices[0].text == expected
        assert r.model_extra["longserve"]["draft_tokens_proposed"] > 0


def test_create_app_refuses_spec_prefill_with_speculative_decoding(loaded):
    target = LLM(loaded=loaded)
    with pytest.raises(InvalidParameterError, match="cannot be combined"):
        create_app(
            target, speculative=SpeculativeDecoder(target, target), spec_prefill=SpeculativePrefill(target)
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longserve")
    server_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_draft_flags(monkeypatch, loaded):
    seen = {}

    class TinyLLM(LLM):  # a class, not a lambda: LLM(draft=...) checks isinstance(draft, LLM)
        def __init__(self, model: str, **kw):
            super().__init__(loaded=loaded, **kw)

    monkeypatch.setattr("longserve.llm.LLM", TinyLLM)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    args = _parser().parse_args(
        ["serve", "--draft", "tiny", "--num-draft-tokens", "5", "--max-model-len", "256"]
    )
    assert args.func(args) == 0
    spec = seen["app"].state.server.spec
    assert spec is not None and spec.decoder.k == 5 and spec.describe()["num_draft_tokens"] == 5

    both = _parser().parse_args(["serve", "--draft", "tiny", "--prefill-draft", "tiny"])
    with pytest.raises(InvalidParameterError, match="cannot be combined"):
        both.func(both)
    bad_k = _parser().parse_args(["serve", "--draft", "tiny", "--num-draft-tokens", "0"])
    with pytest.raises(InvalidParameterError, match="num-draft-tokens"):
        bad_k.func(bad_k)
