"""Compressed prefix entries: a prefix compressed once under a policy is reused by later requests."""

from __future__ import annotations

import dataclasses

import pytest

from longserve.errors import InvalidParameterError
from longserve.kv.policies import make_policy
from longserve.llm import LLM
from tests.engine.test_prefix_cache import PARAMS, fresh, prompt
from tests.tiny import ByteTokenizer, tiny_loaded


class ChatTokenizer(ByteTokenizer):
    """Bytes with a chat template: '<|role|>content' per message, '<|assistant|>' to generate."""

    chat_template = "turns"

    def apply_chat_template(
        self, messages, add_generation_prompt=False, tokenize=True, return_dict=True, **kw
    ):
        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        return {"input_ids": self.encode(text + ("<|assistant|>" if add_generation_prompt else ""))}


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama")[0]


SNAP = {"policy": "snapkv", "budget": 64, "window": 8, "tokens": 300}


def test_full_prefix_hit_equals_no_cache(loaded):
    """Under `full` the cached prefix is the prompt's exact KV: same greedy tokens as a plain run."""
    shared = prompt(1, 300)
    a, b = shared + prompt(2, 20), shared + prompt(3, 33)
    plain = LLM(loaded=loaded, prefill_chunk=64)
    expected = [out.token_ids for out in plain.generate([a, b], **PARAMS)]
    llm = fresh(loaded)
    spec = {"policy": "full", "tokens": 300}
    first, second = (llm.generate(p, cache_prefix=spec, **PARAMS)[0] for p in (a, b))
    assert [first.token_ids, second.token_ids] == expected
    assert (first.stats["cached_prompt_tokens"], second.stats["cached_prompt_tokens"]) == (0, 300)
    assert first.stats["prompt_tokens"] == 320 and second.stats["prompt_tokens"] == 333
    assert llm.prefix_cache.stats.compressed_hits == 1 and llm.prefix_cache.stats.compressed_entries == 1


def test_a_compressed_prefix_is_made_once_and_is_physically_small(loaded):
    shared = prompt(4, 300)
    a, b = shared + prompt(5, 20), shared + prompt(6, 25)
    llm = fresh(loaded)
    first = llm.generate(a, cache_prefix=SNAP, **PARAMS)[0]
    second = llm.generate(b, cache_prefix=SNAP, **PARAMS)[0]
    assert second.stats["cached_prompt_tokens"] == 300 and first.stats["cached_prompt_tokens"] == 0
    (entry,) = llm.prefix_cache.entries.values()
    assert entry.fill == 64 and entry.nbytes == 64 * loaded.args.kv_bytes_per_token()
    # the same tokens as compressing by hand and continuing from the context
    ctx = llm.compress(shared, "snapkv", 64, window=8)
    by_hand = list(llm.stream(prompt(6, 25), prefix=ctx, **PARAMS))[-1].seq.output_ids
    assert second.token_ids == by_hand
    # another policy is another entry, never a hit on this one
    other = llm.generate(b, cache_prefix={**SNAP, "budget": 96}, **PARAMS)[0]
    assert other.stats["cached_prompt_tokens"] == 0 and len(llm.prefix_cache.entries) == 2


def test_one_budget_holds_compressed_and_full_entries_lru(loaded):
    per_entry = 64 * loaded.args.kv_bytes_per_token()
    llm = fresh(loaded, cache=str(2 * per_entry + 1))
    for seed in (10, 11, 12):  # three different prefixes: the oldest is evicted
        llm.generate(prompt(seed, 300) + [1, 2, 3], cache_prefix=SNAP, **PARAMS)
    stats = llm.prefix_cache.stats
    assert (stats.compressed_entries, stats.evicted) == (2, 1) and stats.bytes == 2 * per_entry
    again = llm.generate(prompt(10, 300) + [1, 2, 3], cache_prefix=SNAP, **PARAMS)[0]
    assert again.stats["cached_prompt_tokens"] == 0  # it was the one evicted


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache_prefix": {**SNAP, "tokens": 320}}, "must leave at least one"),
        ({"cache_prefix": {"policy": "snapkv", "budget": 64}}, "needs the prefix length"),
        ({"cache_prefix": {**SNAP, "budget": 0}}, "budget must be > 0"),
        ({"cache_prefix": SNAP, "kv_policy": "snapkv"}, "runs under 'full'"),
        ({"cache_prefix": "snapkv"}, "cache_prefix takes"),
    ],
)
def test_bad_cache_prefix_is_a_clear_error(loaded, kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        fresh(loaded).generate(prompt(7, 320), **kwargs, **PARAMS)


def test_cache_prefix_needs_a_prefix_cache(loaded):
    with pytest.raises(InvalidParameterError, match="needs a prefix cache"):
        LLM(loaded=loaded).generate(prompt(8, 320), cache_prefix=SNAP, **PARAMS)


def test_chat_messages_cache_everything_before_the_last_turn(loaded):
    llm = fresh(dataclasses.replace(loaded, tokenizer=ChatTokenizer()))
    history = [{"role": "system", "content": "word " * 200}, {"role": "user", "content": "first"}]
    ids = llm.encode(history + [{"role": "user", "content": "second"}])
    n = llm.chat_prefix_len(history + [{"role": "user", "content": "second"}], ids)
    assert n == len(ChatTokenizer().apply_chat_template(history)["input_ids"]) and n < len(ids)
    spec = {"policy": "snapkv", "budget": 64, "window": 8}
    llm.generate(history + [{"role": "user", "content": "second"}], cache_prefix=spec, **PARAMS)
    out = llm.generate(history + [{"role": "user", "content": "third"}], cache_prefix=spec, **PARAMS)[0]
    assert out.stats["cached_prompt_tokens"] == n
    assert make_policy(**llm.prefix_cache.entries[0].policy) == make_policy("snapkv", budget=64, window=8)
