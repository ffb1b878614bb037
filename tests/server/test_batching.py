"""Continuous batching and KV memory admission behind the HTTP front."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from longserve.llm import LLM
from longserve.server.kv_plan import plan_kv

PROMPTS = [
    "alpha",
    "a much longer prompt that needs more prefill",
    "x",
    "the quick brown fox",
    "0123456789",
    "zz",
]


def _complete(client, prompt: str, max_tokens: int = 16, ignore_eos: bool = False):
    r = client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        temperature=0,
        max_tokens=max_tokens,
        extra_body={"ignore_eos": ignore_eos},
    )
    return r.choices[0].text, r.usage.completion_tokens


def test_concurrent_requests_give_the_one_at_a_time_greedy_outputs(server, loaded):
    client = server.client()
    one_at_a_time = [_complete(client, p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(lambda p: _complete(client, p), PROMPTS))
    diff = [(p, a, b) for p, a, b in zip(PROMPTS, one_at_a_time, concurrent, strict=True) if a != b]
    assert not diff, f"(prompt, one at a time, concurrent): {diff}"
    offline = LLM(loaded=loaded).generate(PROMPTS, max_new_tokens=16)  # the offline engine agrees too
    assert [c.text for c in offline] == [text for text, _ in one_at_a_time]
    server.wait_idle()


def test_memory_admission_never_runs_more_sequences_than_slots(serve):
    # 128-token slots under `full`, 256 tokens of KV memory: exactly 2 slots, even with max_batch_size 4
    with serve(max_model_len=128, max_kv_memory="256tok") as s:
        assert s.state.plan.n_slots == 2 and s.state.engine.engine.pool.n_slots == 2
        client = s.client()
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda p: _complete(client, p, 24, ignore_eos=True), PROMPTS))
        assert all(n == 24 for _, n in results)
        assert s.state.engine.max_running_seen == 2
        s.wait_idle()


def test_per_request_kv_policy_must_fit_the_slot(serve):
    prompt = "long context " * 16  # 208 byte-tokens, beyond a 64-token budget
    with serve(max_model_len=512) as s:  # full by default: a snapstream request fits its 512-token slot
        r = s.client().completions.create(
            model="tiny-llama",
            prompt=prompt,
            temperature=0,
            max_tokens=8,
            extra_body={"ignore_eos": True, "kv_policy": {"name": "snapstream", "budget": 64}},
        )
        stats = r.model_extra["longserve"]
        # the prompt is compressed to the budget; in a slot larger than its budget the engine's ring
        # currently wraps at the slot's capacity, so decoded tokens may be appended on top
        assert stats["kv_policy"] == "snapstream" and 64 <= stats["kv_tokens_final"] <= 64 + 8
        assert stats["compression_ratio"] >= (208 + 8) / (64 + 8)


def test_snapstream_default_multiplies_capacity(serve, loaded):
    llm = LLM(loaded=loaded, kv_policy="snapstream", kv_budget=64, max_batch_size=64)
    plan = plan_kv(llm, llm.policy(), max_model_len=1024, max_kv_memory="4096tok")
    assert (plan.slot_capacity, plan.n_slots, plan.full_sequences_by_memory) == (64, 64, 4)
    assert plan.capacity_ratio == 1024 / 64
    with serve(llm=llm, max_model_len=1024, max_batch_size=2) as s:
        client = s.client()
        r = client.completions.create(model="tiny-llama", prompt="y" * 300, temperature=0, max_tokens=4)
        assert r.model_extra["longserve"]["kv_tokens_final"] == 64
        # `full` for a long prompt needs more than the 64-token slot: rejected up front, nothing queued
        resp = s.http.post(
            "/v1/completions", json={"prompt": "y" * 300, "max_tokens": 4, "kv_policy": {"name": "full"}}
        )
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
        s.wait_idle()
