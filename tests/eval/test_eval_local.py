"""LocalTarget: the engine behind the eval harness, on a tiny random model (fast, no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from longserve.errors import InvalidParameterError
from longserve.eval.local import LocalTarget, policy_label
from longserve.eval.suite import make_suite
from longserve.eval.target import EvalRequest, Target
from longserve.llm import LLM

try:
    from tests.tiny import ByteTokenizer, tiny_loaded
except ModuleNotFoundError:  # tests/eval has no __init__.py: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.tiny import ByteTokenizer, tiny_loaded


class ChatByteTokenizer(ByteTokenizer):
    """ByteTokenizer with a toy chat template, to exercise the chat path of both settings."""

    chat_template = "toy"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, return_dict=False):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids} if return_dict else ids


@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is faster single-threaded, and CI machines are shared
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def llm(one_thread):
    loaded, _ = tiny_loaded("llama")
    return LLM(loaded=loaded, progress=False)


@pytest.fixture(scope="module")
def chat_llm(one_thread):
    loaded, _ = tiny_loaded("llama")
    loaded.tokenizer = ChatByteTokenizer()
    return LLM(loaded=loaded, progress=False)


def _requests(target, setting, n=2, length=300, max_new_tokens=3):
    samples = make_suite(["niah_single_1"], n, length, target.count_tokens, seed=1)
    return [EvalRequest(s.context, s.question, max_new_tokens, setting) for s in samples]


def test_labels():
    assert policy_label() == "full"
    assert policy_label("snapkv", 256) == "snapkv@256"
    assert policy_label("snapkv", kv_ratio=0.25) == "snapkv@r0.25"


def test_implements_protocol_and_counts_without_specials(llm):
    target = LocalTarget(llm, "snapkv", 64)
    assert isinstance(target, Target)
    assert target.name == "snapkv@64"
    assert target.count_tokens("hello") == 5  # bytes, no BOS
    assert LocalTarget(llm, name="mine").name == "mine"
    with pytest.raises(InvalidParameterError, match="unknown kv policy"):
        LocalTarget(llm, "nope")


@pytest.mark.parametrize("setting", ["query_aware", "query_agnostic"])
def test_both_settings_report_kv_and_compression_saves_memory(llm, setting):
    full, snap = LocalTarget(llm), LocalTarget(llm, "snapkv", 32)
    requests = _requests(full, setting)
    results = {t.name: t.answer(requests) for t in (full, snap)}
    for rs in results.values():
        assert len(rs) == len(requests)
        for r, req in zip(rs, requests, strict=True):
            assert r.kv_bytes > 0 and r.ttft_s > 0
            assert r.extra["setting"] == setting and r.extra["kv_bytes_allocated"] > 0
            assert 1 <= r.extra["completion_tokens"] <= req.max_new_tokens
            # the whole prompt is counted in both settings (context + question, no template here)
            assert r.prompt_tokens == len((req.context + req.question).encode())
    for f, s in zip(results["full"], results["snapkv@32"], strict=True):
        assert s.kv_bytes < f.kv_bytes
        assert s.extra["kv_tokens_final"] < f.extra["kv_tokens_final"]
        assert s.extra["compression_ratio"] > 1.5 > f.extra["compression_ratio"]
    if setting == "query_agnostic":
        r = results["snapkv@32"][0]
        assert r.extra["compressed_context_tokens"] == 32 < r.extra["context_tokens"]
        assert r.ttft_s >= r.extra["compress_s"]


def test_agnostic_full_matches_aware_full(llm):
    """With no compression, splitting the prompt must not change the greedy answer."""
    target = LocalTarget(llm)
    aware = target.answer(_requests(target, "query_aware", n=1, max_new_tokens=4))
    agnostic = target.answer(_requests(target, "query_agnostic", n=1, max_new_tokens=4))
    assert [r.text for r in aware] == [r.text for r in agnostic]


def test_chat_template_split_and_raw_prompt(chat_llm):
    target = LocalTarget(chat_llm)
    req = EvalRequest("some context\n", "\nthe question?", 3)
    head, tail = target.split_ids(req)
    assert head + tail == chat_llm.encode([{"role": "user", "content": req.context + req.question}])
    assert bytes(tail).decode().startswith("\nthe question?</user>")
    raw = EvalRequest(req.context, req.question, 3, raw_prompt=True)
    assert target.split_ids(raw) == (list(req.context.encode()), list(req.question.encode()))
    chat = req.context + req.question
    by_setting = {}
    for setting in ("query_aware", "query_agnostic"):
        results = target.answer(
            [
                EvalRequest(req.context, req.question, 3, setting),
                EvalRequest(req.context, req.question, 3, setting, raw_prompt=True),
            ]
        )
        by_setting[setting] = results
        assert results[0].prompt_tokens == len(f"<user>{chat}</user><assistant>")
        assert results[1].prompt_tokens == len(chat)
    assert [r.text for r in by_setting["query_aware"]] == [r.text for r in by_setting["query_agnostic"]]


def test_mixed_batches_keep_request_order(llm):
    target = LocalTarget(llm)
    reqs = [
        EvalRequest("a " * 20, "q1?", 2),
        EvalRequest("b " * 30, "q2?", 3, "query_agnostic"),
        EvalRequest("c " * 25, "q3?", 1),
    ]
    results = target.answer(reqs)
    assert [r.extra["setting"] for r in results] == ["query_aware", "query_agnostic", "query_aware"]
    assert [r.prompt_tokens for r in results] == [43, 63, 53]
    assert [r.extra["completion_tokens"] <= n for r, n in zip(results, (2, 3, 1), strict=True)] == [True] * 3


def test_compress_token_ids_full_policy(llm):
    ids = list(range(40, 140))
    ctx = llm.compress(ids, kv_policy="full")
    assert ctx.fill == ctx.n_context_tokens == 100
    assert llm.compress(ids, kv_policy="streaming", kv_budget=16).fill == 16


def test_runner_passes_raw_prompt_flag(tmp_path, fake_target):
    from longserve.eval.runner import run_eval
    from longserve.eval.sample import Sample

    samples = [
        Sample("a/1", "a", "ctx ", "q?", ["x"], metadata={"raw_prompt": True}),
        Sample("b/1", "b", "ctx ", "q?", ["x"]),
    ]
    target = fake_target("full")
    run_eval(samples, {"full": target}, tmp_path, progress=False, plots=False)
    assert [r.raw_prompt for r in target.seen] == [True, False]
