"""KV memory sizing and the `longserve serve` command line (without binding a port)."""

from __future__ import annotations

import argparse

import pytest

from longserve.errors import InvalidParameterError
from longserve.llm import LLM
from longserve.server import cli as server_cli
from longserve.server.kv_plan import MAX_AUTO_SLOTS, KVMemory, parse_kv_memory, plan_kv
from tests.tiny import tiny_loaded


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", KVMemory(4 * 1024**3, "bytes")),
        ("512MB", KVMemory(512 * 10**6, "bytes")),
        ("1.5 kib", KVMemory(1536, "bytes")),
        ("65536tok", KVMemory(65536, "tokens")),
        (1000, KVMemory(1000, "bytes")),
    ],
)
def test_parse_kv_memory(text, expected):
    assert parse_kv_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "4XB", "-1GiB", ""])
def test_parse_kv_memory_rejects_nonsense(text):
    with pytest.raises(InvalidParameterError):
        parse_kv_memory(text)


def test_plan_counts_sliding_window_layers_as_their_ring():
    loaded, _ = tiny_loaded("gemma3")  # 3 sliding layers (window 24) + 1 global layer
    args = loaded.args
    per_entry = 2 * args.n_kv_heads * args.head_dim * 4
    full = LLM(loaded=loaded, max_batch_size=100)
    plan = plan_kv(full, full.policy(), max_model_len=1024, max_kv_memory=10 * per_entry * (3 * 24 + 1024))
    assert plan.slot_bytes == per_entry * (3 * 24 + 1024) and plan.n_slots == 10
    snap = LLM(loaded=loaded, kv_policy="snapstream", kv_budget=128, max_batch_size=100)
    plan = plan_kv(snap, snap.policy(), max_model_len=1024, max_batch_size=8, max_kv_memory="1GiB")
    assert plan.slot_capacity == 128 and plan.slot_bytes == per_entry * (3 * 24 + 128) and plan.n_slots == 8
    assert plan.capacity_ratio == (3 * 24 + 1024) / (3 * 24 + 128)
    with pytest.raises(InvalidParameterError, match="does not hold one sequence slot"):
        plan_kv(full, full.policy(), max_model_len=1024, max_kv_memory="1000tok")
    with pytest.raises(InvalidParameterError, match="max_model_len"):
        plan_kv(full, full.policy(), max_model_len=4096)


def test_a_memory_limit_alone_sets_the_batch_size():
    """Issue 16: `--max-kv-memory 2GiB` ran the default 8 slots while 45 fit."""
    loaded, _ = tiny_loaded("llama")
    llm = LLM(loaded=loaded, kv_policy="snapstream", kv_budget=128)  # LLM's default max_batch_size: 8
    one = plan_kv(llm, llm.policy(), max_model_len=1024, max_kv_memory="128tok").slot_bytes
    plan = plan_kv(llm, llm.policy(), max_model_len=1024, max_kv_memory=45 * one + one // 2)
    assert (plan.n_slots, plan.sequences_by_memory, plan.slots_limited_by) == (45, 45, "memory")
    assert "45 slots (all that --max-kv-memory" in plan.describe()
    explicit = plan_kv(llm, llm.policy(), max_model_len=1024, max_batch_size=8, max_kv_memory=45 * one)
    assert explicit.n_slots == 8 and "--max-batch-size; --max-kv-memory" in explicit.describe()
    assert (
        plan_kv(llm, llm.policy(), max_model_len=1024, max_batch_size=64, max_kv_memory=45 * one).n_slots
        == 45
    )
    capped = plan_kv(llm, llm.policy(), max_model_len=1024, max_kv_memory=f"{1000 * 128}tok")
    assert capped.n_slots == MAX_AUTO_SLOTS and capped.slots_limited_by == "cap"
    assert plan_kv(llm, llm.policy(), max_model_len=1024).n_slots == 8  # no limit: the LLM's batch size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longserve")
    server_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_serve_defaults_bind_loopback():
    args = _parser().parse_args(["serve"])
    assert (args.host, args.port, args.kv_policy, args.api_key) == ("127.0.0.1", 8000, "full", None)


def test_cmd_serve_builds_the_app_with_env_api_key(monkeypatch, loaded):
    seen = {}
    monkeypatch.setattr("longserve.llm.LLM", lambda model, **kw: LLM(loaded=loaded, **kw))
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("LONGSERVE_API_KEY", "from-env")
    args = _parser().parse_args(
        [
            "serve",
            "--kv-policy",
            "snapstream",
            "--kv-budget",
            "64",
            "--max-model-len",
            "1024",
            "--max-kv-memory",
            "256tok",
            "--port",
            "8123",
            "--log-level",
            "warning",
        ]
    )
    assert args.func(args) == 0
    state = seen["app"].state.server
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert state.default_policy.name == "snapstream" and state.plan.n_slots == 4
    assert any(m.kwargs.get("api_key") == "from-env" for m in seen["app"].user_middleware)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4k", KVMemory(4096, "bytes")),
        ("64ktok", KVMemory(65536, "tokens")),
        ("1.5ktokens", KVMemory(1536, "tokens")),
        ("4kb", KVMemory(4000, "bytes")),
    ],
)
def test_k_means_1024_as_in_the_eval_cli(text, expected):
    """A bare `k` is 1024, as in `longserve eval --lengths 4k` (it was 1000 here); `kb` stays SI."""
    assert parse_kv_memory(text) == expected


def test_one_count_parser():
    from longserve.eval.suite import parse_lengths
    from longserve.units import parse_count

    assert parse_count("4k") == parse_lengths("4k")[0] == 4096 and parse_count("2m") == 2 * 1024**2
    with pytest.raises(ValueError):
        parse_count("1k2")


def test_cmd_serve_derives_slots_from_memory_and_prints_the_plan(monkeypatch, loaded, capsys):
    seen = {}
    monkeypatch.setattr("longserve.llm.LLM", lambda model, **kw: LLM(loaded=loaded, **kw))
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app))
    argv = ["serve", "--kv-policy", "snapstream", "--kv-budget", "64", "--max-model-len", "1024"]
    args = _parser().parse_args([*argv, "--max-kv-memory", "2880tok"])
    assert args.max_batch_size is None and args.func(args) == 0
    assert seen["app"].state.server.plan.n_slots == 45  # 2880 / 64, not the default 8
    line = capsys.readouterr().err
    assert "KV plan 'snapstream': 45 slots (all that --max-kv-memory 2880tok holds" in line
    args = _parser().parse_args([*argv, "--max-kv-memory", "2880tok", "--max-batch-size", "8"])
    assert args.func(args) == 0 and seen["app"].state.server.plan.n_slots == 8
