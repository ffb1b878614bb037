"""Several tiny random models behind one server: each answers with its own weights, parks and comes
back the same, the weight budget holds, switches under concurrent load, cancelling while waiting for a
switch, `auto` routing."""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import threading
import time
import weakref

import httpx
import pytest

from longserve.coe.experts import Expert
from longserve.coe.tiers import WeightBudgetError, weight_bytes
from longserve.llm import LLM
from longserve.server import cli as server_cli
from longserve.server.multi_app import create_multi_app
from longserve.server.registry import ModelRegistry
from longserve.server.resident import ServeSettings
from tests.server.conftest import LiveServer
from tests.tiny import tiny_loaded

SEEDS = {"a": 1, "b": 2, "c": 3}
PROMPT = list(range(10, 40))
GREEDY = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
SETTINGS = ServeSettings(max_model_len=256, max_kv_memory="4096tok")


def loaded(model: str):
    if model == "big":  # four times the MLP: larger than a budget that holds one small model
        return tiny_loaded("llama", seed=4, intermediate_size=512)[0]
    return tiny_loaded("llama", seed=SEEDS[model])[0]


class Builder:
    """A tiny random LLM per expert (its seed decides its weights); records what was resident at each
    load, and can hold a load back (`hold`) to keep a switch in progress."""

    def __init__(self):
        self.registry: ModelRegistry | None = None
        self.loads: list[str] = []
        self.peak_bytes = 0  # resident weight bytes + the one being loaded, at the worst load
        self.hold: set[str] = set()
        self.gate = threading.Event()

    def __call__(self, expert: Expert) -> LLM:
        if expert.name in self.hold:
            assert self.gate.wait(60)
        llm = LLM(loaded=loaded(expert.model), max_batch_size=4, prefill_chunk=64)
        self.loads.append(expert.name)
        if self.registry is not None:
            loading = self.registry.tiers.resident_bytes + weight_bytes(llm)
            self.peak_bytes = max(self.peak_bytes, loading)
        return llm


@pytest.fixture(scope="module")
def size() -> int:
    return weight_bytes(LLM(loaded=tiny_loaded("llama", seed=1)[0]))


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    """Each model's greedy text for PROMPT, generated offline."""
    out = {}
    for name, seed in SEEDS.items():
        llm = LLM(loaded=tiny_loaded("llama", seed=seed)[0])
        out[name] = llm.generate(PROMPT, max_new_tokens=8, ignore_eos=True)[0].text
    assert len(set(out.values())) == 3  # three different models
    return out


def serve(experts, budget=None, builder=None, **kwargs) -> tuple[LiveServer, ModelRegistry, Builder]:
    builder = builder or Builder()
    registry = ModelRegistry(experts, builder, max_weight_memory=budget, settings=SETTINGS, **kwargs)
    builder.registry = registry
    return LiveServer(create_multi_app(registry)), registry, builder


@pytest.fixture(scope="module")
def one_resident(size):
    """Models a, b and c under a budget that holds one of them."""
    server, registry, builder = serve([Expert(n, n) for n in "abc"], budget=size * 3 // 2)
    with server:
        yield server, registry, builder


def complete(server: LiveServer, model: str, **extra) -> httpx.Response:
    return server.http.post("/v1/completions", json={"model": model, **GREEDY, **extra})


def park(server: LiveServer, registry: ModelRegistry, name: str) -> None:
    registry.park_from_thread(name, server.app.state.loop)


def test_each_model_answers_with_its_own_weights_and_the_same_after_a_park(one_resident, reference):
    server, registry, _ = one_resident
    for name in "abca":
        r = complete(server, name)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == name == r.headers["x-longserve-expert"]
        assert body["choices"][0]["text"] == reference[name]
    assert registry.tier("a") == 0
    weights = weakref.ref(registry.residents["a"].llm.loaded.model)
    park(server, registry, "a")
    assert registry.tier("a") == 1 and not registry.residents
    gc.collect()
    assert weights() is None  # parked means freed: nothing (engine, state, lease) still holds it
    r = complete(server, "a")
    assert (
        r.json()["choices"][0]["text"] == reference["a"]
        and float(r.headers["x-longserve-switch-seconds"]) > 0
    )
    again = complete(server, "a")
    assert again.headers["x-longserve-switch-seconds"] == "0.000000"  # resident: no switch
    # a stream gets its headers after the switch, before the first chunk
    with server.http.stream("POST", "/v1/completions", json={"model": "b", "stream": True, **GREEDY}) as s:
        assert s.headers["x-longserve-expert"] == "b" and float(s.headers["x-longserve-switch-seconds"]) > 0
        events = [line for line in s.iter_lines() if line.startswith("data: {")]
    assert events and all('"model":"b"' in e for e in events)


def test_the_budget_is_never_exceeded(one_resident, size):
    server, registry, builder = one_resident
    for name in "cbacab":
        assert complete(server, name).status_code == 200
        assert registry.tiers.resident_bytes <= registry.budget and len(registry.residents) == 1
    assert builder.peak_bytes <= registry.budget  # not even while a model loads
    assert registry.max_resident == 1 and registry.kv_share == "4096tok"  # the whole KV budget each


def test_a_model_larger_than_the_budget_is_refused_at_startup(size):
    registry = ModelRegistry(
        [Expert("a", "a"), Expert("big", "big")], Builder(), max_weight_memory=size * 3 // 2
    )
    with pytest.raises(WeightBudgetError, match="'big' needs .* more than the whole budget"):
        create_multi_app(registry)
    assert not registry.tiers.resident  # nothing left loaded


def test_unknown_model_is_an_openai_404_and_models_lists_every_expert(one_resident):
    server, registry, _ = one_resident
    r = complete(server, "no-such-model")
    error = r.json()["error"]
    assert r.status_code == 404 and (error["code"], error["param"]) == ("model_not_found", "model")
    assert "'a', 'b', 'c'" in error["message"]
    assert server.http.get("/v1/models/no-such-model").status_code == 404
    cards = server.http.get("/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["a", "b", "c"]
    assert sorted(c["longserve"]["tier"] for c in cards) == [0, 1, 1]
    one = server.http.get("/v1/models/b").json()
    assert one["id"] == "b" and one["longserve"]["tier"] == registry.tier("b")


def test_concurrent_requests_to_two_models_while_switching(one_resident, reference):
    """Budget for one model, requests alternating between two: every request waits for its switch
    and gets its own model's output (a park waits for the other model's running requests)."""
    server, registry, _ = one_resident
    jobs = ["a", "b"] * 4

    def one(i: int, name: str) -> tuple[str, str, str]:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            if i % 3 == 0:  # some stream
                body = {"model": name, "stream": True, **GREEDY}
                with http.stream("POST", "/v1/completions", json=body) as s:
                    assert s.status_code == 200
                    chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
                    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
                    return name, s.headers["x-longserve-expert"], text
            r = http.post("/v1/completions", json={"model": name, **GREEDY})
            assert r.status_code == 200, r.text
            return name, r.json()["model"], r.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, range(len(jobs)), jobs))
    assert [(asked, got) for asked, got, _ in results] == [(n, n) for n in jobs]
    assert all(text == reference[name] for name, _, text in results)
    assert registry.kv_bytes() == 0 and sum(registry.waiting.values()) == 0
    assert all(r.leases == 0 for r in registry.residents.values())
    metrics = server.http.get("/metrics").text
    assert 'longserve_coe_switches_total{from_tier="1",model_name="b"}' in metrics
    assert 'vllm:generation_tokens_total{model_name="a"}' in metrics
    assert 'longserve_generation_tokens_total{model_name="b"}' in metrics
    assert (
        "longserve_coe_resident_models 1.0" in metrics and 'longserve_coe_weight_bytes{tier="0"}' in metrics
    )


def test_cancelling_a_request_that_waits_for_a_switch_frees_everything(size, reference):
    builder = Builder()
    server, registry, _ = serve([Expert("a", "a"), Expert("b", "b")], budget=size * 3 // 2, builder=builder)
    with server:
        assert registry.tier("b") == 1
        builder.hold.add("b")  # b's load now waits for the gate: the switch stays in progress
        with pytest.raises(httpx.ReadTimeout):
            server.http.post("/v1/completions", json={"model": "b", **GREEDY}, timeout=1.5)
        assert registry.tiers.stats()["loading"] == ["b"]  # the request started b's switch
        health = server.http.get("/health", timeout=5)  # answers while the switch is held
        assert health.status_code == 200 and health.json()["models"]["b"]["tier"] != 0
        deadline = time.monotonic() + 5
        while registry.waiting["b"] and time.monotonic() < deadline:  # the disconnect reaches the server
            time.sleep(0.05)
        assert registry.waiting["b"] == 0  # the waiter withdrew
        builder.gate.set()
        deadline = time.monotonic() + 10
        while registry.tier("b") != 0 and time.monotonic() < deadline:  # the switch still completes:
            time.sleep(0.05)  # other requests could be waiting for it
        resident = registry.residents["b"]
        assert resident.leases == 0 and registry.kv_bytes() == 0
        assert resident.engine.num_waiting == 0 and not resident.engine.engine.has_unfinished()
        assert complete(server, "b").json()["choices"][0]["text"] == reference["b"]
        # a client that leaves mid-stream releases its lease too: the next park does not wait forever
        body = {"model": "b", "stream": True, **GREEDY, "max_tokens": 200}
        with server.http.stream("POST", "/v1/completions", json=body) as s:
            next(s.iter_lines())
        deadline = time.monotonic() + 10
        while resident.leases and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resident.leases == 0
        park(server, registry, "b")
        assert registry.tier("b") == 1 and registry.kv_bytes() == 0


def test_auto_routes_by_rule_and_default_model(size):
    experts = [Expert("a", "a", rules=[r"```"]), Expert("b", "b", description="stories and poems")]
    server, registry, _ = serve(experts, default_model="auto")
    with server:
        assert registry.router.name == "a" and registry.experts["a"].pinned  # the smallest: first of equals
        r = server.http.post("/v1/completions", json={"prompt": "```print(1)```", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "a" == r.headers["x-longserve-expert"]
        r = server.http.post("/v1/completions", json={"model": "auto", "prompt": "a poem", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] in ("a", "b")
        ids = server.http.post("/v1/completions", json={"model": "auto", "prompt": [1, 2], "max_tokens": 2})
        assert ids.status_code == 400 and "token ids" in ids.json()["error"]["message"]


def test_cli_serves_several_models_and_prints_the_plan(monkeypatch, capsys, size):
    seen = {}
    monkeypatch.setattr(  # the CLI builds experts through the tier-1 AttachLoader
        "longserve.coe.AttachLoader",
        lambda **kw: lambda expert: LLM(loaded=tiny_loaded("llama", seed=SEEDS[expert.model])[0]),
    )
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app))
    parser = argparse.ArgumentParser(prog="longserve")
    server_cli.register(parser.add_subparsers(dest="command"))
    argv = ["serve", "--model", "a", "--model", "b", "--max-kv-memory", "8192tok", "--max-model-len", "256"]
    args = parser.parse_args([*argv, "--max-weight-memory", str(size * 2)])
    assert args.func(args) == 0
    registry = seen["app"].state.registry
    assert (
        list(registry.experts) == ["a", "b"] and registry.max_resident == 2 and registry.kv_share == "4096tok"
    )
    err = capsys.readouterr().err
    assert "serving 'a', 'b'" in err and "split over 2 resident slot(s): 4096tok each" in err
    args = parser.parse_args([*argv, "--max-weight-memory", str(size // 2)])
    with pytest.raises(WeightBudgetError, match="more than the whole budget"):
        args.func(args)
    with pytest.raises(Exception, match="--draft is not supported with several models"):
        args = parser.parse_args([*argv, "--draft", "x"])
        args.func(args)


def test_cli_names_experts_and_refuses_ambiguous_flags(tmp_path):
    from longserve.errors import InvalidParameterError
    from longserve.server.multi_cli import expert_name, experts_of

    parser = argparse.ArgumentParser(prog="longserve")
    server_cli.register(parser.add_subparsers(dest="command"))
    assert expert_name("/models/qwen-0.5b.gguf") == "qwen-0.5b" and expert_name("/m/smollm/") == "smollm"
    with pytest.raises(InvalidParameterError, match="several --model arguments are named a"):
        experts_of(parser.parse_args(["serve", "--model", "x/a", "--model", "y/a"]))
    path = tmp_path / "experts.toml"
    path.write_text('[chat]\nmodel = "a"\n[code]\nmodel = "b"\nrules = ["def "]\npinned = true\n')
    experts = experts_of(parser.parse_args(["serve", "--models", str(path)]))
    assert [(e.name, e.model, e.pinned) for e in experts] == [("chat", "a", False), ("code", "b", True)]
    with pytest.raises(InvalidParameterError, match="--models FILE or with --model, not both"):
        experts_of(parser.parse_args(["serve", "--models", str(path), "--model", "a"]))
