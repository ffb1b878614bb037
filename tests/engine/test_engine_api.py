"""The public engine API other packages build on: prefill without sampling, appending tokens chosen
elsewhere, and one request type (SamplingParams + policy) for generate/stream."""

from __future__ import annotations

import pytest
import torch

from longserve.engine.sampler import SamplingParams
from longserve.errors import InvalidParameterError
from longserve.kv.policies import FullPolicy, make_policy
from longserve.llm import LLM
from tests.tiny import tiny_loaded


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(loaded=tiny_loaded("llama")[0], max_batch_size=4, prefill_chunk=16)


def test_prefill_runs_every_chunk_and_returns_the_step_logits(llm):
    ids = prompt(1, 50)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine = llm.engine(1, 60)
    seq = engine.add_request(ids, params, FullPolicy())
    logits = engine.prefill(seq)
    assert seq.prefilled == 50 and engine.pool.slots[seq.slot].fill == 50
    first = int(logits.argmax())
    expected = llm.generate(ids, params, "full")[0].token_ids
    assert first == expected[0]
    # the rest of the sequence decodes from there exactly as a plain run
    engine.emit([seq], logits)
    while engine.has_unfinished():
        engine.step()
    assert seq.output_ids == expected


def test_append_tokens_applies_stop_and_length_rules(llm):
    ids = prompt(2, 20)
    engine = llm.engine(1, 40)
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=3, ignore_eos=True), FullPolicy())
    engine.prefill(seq)
    outs = engine.append_tokens(seq, [5, 6, 7, 8, 9])
    assert [o.finished for o in outs] == [False, False, True]  # stops at max_new_tokens, drops the rest
    assert seq.output_ids == [5, 6, 7] and seq.finish_reason == "length"
    assert seq.slot is None and not engine.has_unfinished()  # the slot is freed at once


def test_prefill_refuses_a_sequence_without_a_slot(llm):
    engine = llm.engine(1, 40)
    params = SamplingParams(max_new_tokens=2)
    engine.add_request(prompt(3, 10), params, FullPolicy())
    waiting = engine.add_request(prompt(4, 10), params, FullPolicy())
    with pytest.raises(RuntimeError, match="no free KV slot"):
        engine.prefill(waiting)


def test_generate_takes_sampling_params_or_keywords_and_token_ids(llm):
    ids = prompt(5, 60)
    by_keywords = llm.generate(ids, max_new_tokens=5, ignore_eos=True, kv_policy="snapkv", kv_budget=40)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    by_params = llm.generate([ids], params, make_policy("snapkv", budget=40))
    assert by_keywords[0].token_ids == by_params[0].token_ids and len(by_params[0].token_ids) == 5
    assert by_params[0].stats["kv_policy"] == "snapkv"
    streamed = [out.seq.output_ids for out in llm.stream(ids, params, "snapkv", kv_budget=40)][-1]
    assert streamed == by_params[0].token_ids


def test_sampling_given_twice_is_refused(llm):
    with pytest.raises(InvalidParameterError, match="not both"):
        llm.generate(prompt(6, 10), SamplingParams(max_new_tokens=2), temperature=0.5)


def test_a_request_larger_than_the_slots_names_the_slot_size(llm):
    engine = llm.engine(1, 40)
    with pytest.raises(Exception, match="each KV slot holds 40") as info:
        engine.add_request(prompt(7, 60), SamplingParams(max_new_tokens=2), FullPolicy())
    assert "--kv-budget" in str(info.value) and '"budget": 40' in str(info.value)


def test_a_failing_prefill_in_a_packed_step_fails_alone(llm, monkeypatch):
    """Two prompts share one packed prefill; the pack raises, each then runs alone: the step names only
    the culprit, and the first prompt's token (already sampled) comes with the next step."""
    engine = llm.engine(2, 64)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    good = engine.add_request(prompt(1, 10), params, make_policy("full"))
    bad = engine.add_request(prompt(2, 10), params, make_policy("full"))
    run = engine.runner.prefill_packed

    def failing(chunks):
        if any(seq is bad for seq, _ in chunks):
            raise RuntimeError("injected")
        return run(chunks)

    monkeypatch.setattr(engine.runner, "prefill_packed", failing)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert engine.last_step.seqs == [bad]
    engine.abort(bad.request_id)
    assert [out.seq for out in engine.step()] == [good] and len(good.output_ids) == 1
    while engine.has_unfinished():
        engine.step()
    assert len(good.output_ids) == 4


def test_a_prefill_step_runs_its_chunks_in_one_forward_with_the_logits_of_each_alone(llm, monkeypatch):
    prompts = [prompt(10 + i, 5 + 7 * i) for i in range(3)]
    alone = []
    for ids in prompts:
        engine = llm.engine(1, 64)
        seq = engine.add_request(ids, SamplingParams(max_new_tokens=1), make_policy("full"))
        alone.append(engine.prefill(seq))
    engine = llm.engine(3, 64)
    seqs = [engine.add_request(ids, SamplingParams(max_new_tokens=1), make_policy("full")) for ids in prompts]
    engine.scheduler.admit()
    forwards = []
    hidden_states = engine.runner.model.hidden_states
    monkeypatch.setattr(
        engine.runner.model, "hidden_states", lambda *a: forwards.append(a[0].shape) or hidden_states(*a)
    )
    logits = engine.runner.prefill_packed([(s, s.prompt_len) for s in seqs])
    assert forwards == [torch.Size([1, sum(len(p) for p in prompts)])]
    for packed, single in zip(logits, alone, strict=True):
        torch.testing.assert_close(packed, single, atol=1e-4, rtol=1e-4)
    assert all(s.prefilled == s.prompt_len for s in seqs)
