"""Automatic prefix caching: a hit gives exactly a miss's tokens, and the cache stays consistent."""

from __future__ import annotations

import pytest
import torch

from longserve.engine.prefix_cache import PrefixCache
from longserve.engine.sampler import SamplingParams
from longserve.kv.policies import REGISTRY, FullPolicy, make_policy
from longserve.llm import LLM
from tests.tiny import tiny_loaded


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama")[0]


def fresh(loaded, cache="64MB", **kw) -> LLM:
    return LLM(loaded=loaded, prefill_chunk=64, prefix_cache=cache, **kw)


PARAMS = dict(max_new_tokens=8, ignore_eos=True)


def test_a_hit_gives_the_same_greedy_tokens_as_a_miss(loaded):
    shared = prompt(1, 300)
    a, b = shared + prompt(2, 20), shared + prompt(3, 37)
    plain = LLM(loaded=loaded, prefill_chunk=64)
    expected = [out.token_ids for out in plain.generate([a, b], **PARAMS)]
    llm = fresh(loaded)
    first = llm.generate(a, **PARAMS)[0]
    second = llm.generate(b, **PARAMS)[0]
    assert [first.token_ids, second.token_ids] == expected
    assert first.stats["cached_prompt_tokens"] == 0
    assert second.stats["cached_prompt_tokens"] == 288  # 18 full blocks of 16 shared with `a`
    assert second.stats["prompt_tokens"] == len(b)
    again = llm.generate(a, **PARAMS)[0]  # the whole prompt is cached but its last token is prefilled
    assert again.token_ids == expected[0] and again.stats["cached_prompt_tokens"] == 304
    stats = llm.prefix_cache.stats
    assert (stats.hits, stats.misses, stats.hit_tokens) == (2, 1, 592)


def test_prompts_of_one_call_reuse_each_other(loaded):
    shared = prompt(4, 200)
    batch = [shared + prompt(5 + i, 10) for i in range(3)]
    llm = fresh(loaded)
    outs = llm.generate(batch, **PARAMS)
    assert [o.stats["cached_prompt_tokens"] for o in outs] == [0, 192, 192]
    plain = LLM(loaded=loaded, prefill_chunk=64).generate(batch, **PARAMS)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]


def test_a_changed_token_misses_from_its_block_on(loaded):
    base = prompt(6, 400)
    llm = fresh(loaded)
    llm.generate(base, **PARAMS)
    changed = list(base)
    changed[150] = (changed[150] + 1) % 256  # inside the tenth block (144-159)
    out = llm.generate(changed, **PARAMS)[0]
    assert out.stats["cached_prompt_tokens"] == 144
    plain = LLM(loaded=loaded, prefill_chunk=64).generate(changed, **PARAMS)[0]
    assert out.token_ids == plain.token_ids


def test_the_fingerprint_is_part_of_every_hash():
    ids = list(range(200))
    assert PrefixCache(10**6, "model-a").block_hashes(ids) != PrefixCache(10**6, "model-b").block_hashes(ids)
    assert len(PrefixCache(10**6, "m", block_size=64).block_hashes(ids)) == 3


def test_eviction_keeps_the_budget_and_the_index_consistent(loaded):
    llm = fresh(loaded)
    cache = llm.prefix_cache
    llm.generate(prompt(7, 130), **PARAMS)
    one_entry = cache.stats.bytes
    cache.max_bytes = one_entry + one_entry // 2  # room for one entry of this size
    llm.generate(prompt(8, 130), **PARAMS)
    assert cache.stats.entries == 1 and cache.stats.evicted == 1 and cache.stats.bytes <= cache.max_bytes
    assert all(holders for holders in cache.index.values())
    assert {e for holders in cache.index.values() for e in holders} == set(cache.entries)
    assert llm.generate(prompt(7, 130), **PARAMS)[0].stats["cached_prompt_tokens"] == 0  # evicted: a miss


def test_an_entry_evicted_while_a_request_uses_it_still_serves_that_request(loaded):
    shared = prompt(9, 260)
    llm = fresh(loaded)
    llm.generate(shared + [1], **PARAMS)
    engine = llm.engine(1, 400)
    seq = engine.add_request(shared + [2, 3], SamplingParams(**PARAMS), FullPolicy())
    engine.step()  # the first prefill step attaches the cached prefix ...
    assert seq.cached_tokens == 256
    for entry_id in list(llm.prefix_cache.entries):  # ... which is then evicted under it
        llm.prefix_cache._evict(entry_id)
    while engine.has_unfinished():
        engine.step()
    plain = LLM(loaded=loaded, prefill_chunk=64).generate(shared + [2, 3], **PARAMS)[0]
    assert seq.output_ids == plain.token_ids


def test_a_cancelled_request_leaves_the_cache_as_it_was(loaded):
    llm = fresh(loaded)
    engine = llm.engine(1, 600)
    seq = engine.add_request(prompt(10, 500), SamplingParams(**PARAMS), FullPolicy())
    engine.step()  # one 64-token chunk of eight
    engine.abort(seq.request_id)
    assert llm.prefix_cache.stats.entries == 0 and not llm.prefix_cache.index
    assert engine.pool.n_free == 1


@pytest.mark.parametrize("name", [n for n, c in REGISTRY.items() if c.compresses and not c.has_scoring_pass])
def test_compressing_policies_cache_their_staged_prefix_and_a_hit_equals_a_miss(loaded, name):
    """The cached part is the uncompressed prefix staged before the final chunk compresses: a hit
    skips its prefill, and the policy then selects over exactly the KV a miss would have."""
    shared = prompt(21, 320)
    a, b = shared + prompt(22, 30), shared + prompt(23, 41)
    policy = make_policy(name, budget=96, window=8)
    plain = LLM(loaded=loaded, prefill_chunk=64)
    expected = [plain.generate(p, kv_policy=policy, **PARAMS)[0].token_ids for p in (a, b)]
    llm = fresh(loaded)
    first, second = (llm.generate(p, kv_policy=policy, **PARAMS)[0] for p in (a, b))
    assert [first.token_ids, second.token_ids] == expected
    assert first.stats["cached_prompt_tokens"] == 0 and second.stats["cached_prompt_tokens"] == 320
    assert second.stats["kv_bytes_allocated"] == first.stats["kv_bytes_allocated"]  # still the budget


def test_quest_head_adaptive_scoring_pass_and_sliding_window_models_are_not_cached(loaded):
    llm = fresh(loaded)
    llm.generate(prompt(11, 200), max_new_tokens=2, kv_policy="kvzip", kv_budget=100)
    llm.generate(prompt(11, 200), max_new_tokens=2, kv_policy="quest", kv_budget=64)
    llm.generate(prompt(11, 200), max_new_tokens=2, kv_policy="snapkv", kv_budget=100, head_adaptive=True)
    assert llm.prefix_cache.stats.entries == 0 and llm.prefix_cache.stats.misses == 0
    gemma = LLM(loaded=tiny_loaded("gemma3")[0], prefill_chunk=64, prefix_cache="64MB")
    gemma.generate(prompt(11, 200), max_new_tokens=2)
    assert gemma.prefix_cache.stats.entries == 0


def test_bad_cache_sizes_are_refused(loaded):
    from longserve.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError):
        fresh(loaded, cache="lots")
    with pytest.raises(InvalidParameterError, match="bytes"):
        fresh(loaded, cache="4096tok")


def test_prompts_on_one_new_document_all_start_in_one_step(loaded):
    """One miss, then hits inside the same prefill step: the shared phase of a chat or agent workload
    waits for one prefill, not for one prefill per decode step."""
    shared = prompt(8, 200)
    batch = [shared + prompt(9 + i, 10) for i in range(4)]
    llm = LLM(loaded=loaded, prefill_chunk=512, prefix_cache="64MB")
    engine = llm.engine(4, 256)
    seqs = [engine.add_request(ids, SamplingParams(**PARAMS), make_policy("full")) for ids in batch]
    forwards, hidden_states = [], engine.runner.model.hidden_states
    engine.runner.model.hidden_states = lambda *a: forwards.append(a[0].shape[1]) or hidden_states(*a)
    first = engine.step()
    del engine.runner.model.hidden_states
    assert forwards == [210, 3 * (210 - 192)]  # the miss alone, then the three hits' suffixes together
    assert [out.seq for out in first] == seqs and all(len(s.output_ids) == 1 for s in seqs)
    assert [s.cached_tokens for s in seqs] == [0, 192, 192, 192]
    while engine.has_unfinished():
        engine.step()
    plain = LLM(loaded=loaded, prefill_chunk=64).generate(batch, **PARAMS)
    assert [s.output_ids for s in seqs] == [o.token_ids for o in plain]
