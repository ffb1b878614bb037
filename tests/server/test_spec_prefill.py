"""`longserve serve --prefill-draft`: prompts pruned by a draft before the batched target prefills them."""

from __future__ import annotations

import argparse

import pytest

from longserve.errors import InvalidParameterError
from longserve.llm import LLM
from longserve.server import cli as server_cli
from longserve.specprefill import SpecPrefillConfig, SpeculativePrefill
from tests.server.test_robustness import _metrics

GREEDY = {"temperature": 0, "max_tokens": 10, "extra_body": {"ignore_eos": True}}
LONG = "the quick brown fox jumps over the lazy dog while the cat sleeps. " * 6  # ~400 byte tokens


@pytest.fixture(scope="module")
def sp_server(serve, loaded):
    """The target's own weights as the prefill draft (same tokenizer: original positions); keep 0.5."""
    draft = LLM(loaded=loaded)
    with serve(
        spec_prefill=SpeculativePrefill(draft, SpecPrefillConfig(keep=0.5, keep_tail=16)), max_model_len=1024
    ) as s:
        yield s


def _body(**spec) -> dict:
    return {**GREEDY, "extra_body": {**GREEDY["extra_body"], **spec}}


def test_keep_one_is_the_plain_answer(server, sp_server):
    messages = [{"role": "user", "content": LONG[:300]}]
    plain = server.client().chat.completions.create(model="tiny-llama", messages=messages, **GREEDY)
    full = sp_server.client().chat.completions.create(
        model="tiny-llama", messages=messages, **_body(spec_prefill={"keep": 1.0, "draft": "tiny-llama"})
    )
    assert full.choices[0].message.content == plain.choices[0].message.content
    assert full.usage.prompt_tokens == full.usage.original_prompt_tokens == plain.usage.prompt_tokens
    assert full.model_extra["longserve"]["spec_prefill"]["ratio"] == 1.0

    left = LONG[:200]
    expected = server.client().completions.create(model="tiny-llama", prompt=left, **GREEDY).choices[0].text
    chunks = list(
        sp_server.client().completions.create(
            model="tiny-llama",
            prompt=left,
            stream=True,
            stream_options={"include_usage": True},
            **_body(spec_prefill={"keep": 1}),
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.original_prompt_tokens == chunks[-1].usage.prompt_tokens == 200

    off = sp_server.client().completions.create(model="tiny-llama", prompt=left, **_body(spec_prefill=False))
    assert off.choices[0].text == expected and off.usage.model_extra.get("original_prompt_tokens") is None
    assert "spec_prefill" not in off.model_extra["longserve"]


def test_default_keep_prunes_long_prompts(sp_server):
    client = sp_server.client()
    before = _metrics(sp_server).get("longserve_spec_prefill_requests_total", 0)
    r = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": LONG}], **GREEDY
    )
    u = r.usage
    assert u.original_prompt_tokens == len(f"user: {LONG}\nassistant: ".encode())
    assert u.prompt_tokens < 0.7 * u.original_prompt_tokens and u.completion_tokens == 10
    sp = r.model_extra["longserve"]["spec_prefill"]
    assert sp["path"] == "same_tokenizer" and sp["kept_tokens"] == u.prompt_tokens

    ids = list(LONG.encode())  # token-id prompts are pruned as ids, with a per-request keep rate
    r = client.completions.create(model="tiny-llama", prompt=ids, **_body(spec_prefill={"keep": 0.25}))
    assert r.usage.original_prompt_tokens == len(ids) and r.usage.prompt_tokens < 0.45 * len(ids)
    short = client.completions.create(model="tiny-llama", prompt="hi", **GREEDY)  # too short to prune
    assert short.usage.prompt_tokens == short.usage.original_prompt_tokens == 2
    sp_server.wait_idle()
    m = _metrics(sp_server)
    assert m["longserve_spec_prefill_requests_total"] == before + 3
    assert m["longserve_spec_prefill_kept_tokens_total"] < m["longserve_spec_prefill_original_tokens_total"]
    assert sp_server.http.get("/health").json()["spec_prefill"] == {
        "draft": "tiny-llama",
        "keep": 0.5,
        "keep_tail": 16,
    }


@pytest.mark.parametrize(
    "value", [{"keep": 2}, {"keep": 0}, {"keep": "half"}, {"draft": "another-model"}, {"bogus": 1}, "yes", 3]
)
def test_bad_spec_prefill_values_are_400(sp_server, value):
    r = sp_server.http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2, "spec_prefill": value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "spec_prefill"


def test_without_a_prefill_draft_only_off_is_accepted(server):
    r = server.http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "spec_prefill": {"keep": 0.5}},
    )
    assert r.status_code == 400 and "--prefill-draft" in r.json()["error"]["message"]
    for value in (False, None, True, {"enabled": False}):
        ok = server.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "spec_prefill": value})
        assert ok.status_code == 200 and "original_prompt_tokens" not in ok.json()["usage"]


def test_too_long_for_max_model_len_counts_the_original_prompt(sp_server):
    r = sp_server.http.post("/v1/completions", json={"prompt": LONG * 2, "max_tokens": 300})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_cli_prefill_flags(monkeypatch, loaded):
    seen = {}

    class TinyLLM(LLM):
        def __init__(self, model: str, **kw):
            super().__init__(loaded=loaded, **kw)

    monkeypatch.setattr("longserve.llm.LLM", TinyLLM)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    parser = argparse.ArgumentParser(prog="longserve")
    server_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "serve",
            "--prefill-draft",
            "tiny",
            "--prefill-keep",
            "0.3",
            "--prefill-keep-tail",
            "8",
            "--max-model-len",
            "256",
        ]
    )
    assert args.func(args) == 0
    state = seen["app"].state.server
    assert state.prefill.draft_name == "tiny-llama" and state.prefill.sp.config.keep == 0.3
    assert state.prefill.sp.config.keep_tail == 8 and state.spec is None
    with pytest.raises(SystemExit):  # `--keep` is not an alias on serve
        parser.parse_args(["serve", "--keep", "0.3"])
    bad = parser.parse_args(["serve", "--prefill-draft", "tiny", "--prefill-keep", "1.5"])
    with pytest.raises(InvalidParameterError, match="prefill-keep"):
        bad.func(bad)
