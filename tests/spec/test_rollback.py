"""After speculative runs with rejections, both caches must be what a plain run left."""

import random

import pytest
import torch

from longserve.engine.sampler import SamplingParams
from longserve.spec import SpeculativeDecoder, SpeculativeSlot
from tests.spec.helpers import llm, perturbed, prompt

POLICIES = [
    ("full", {}),
    ("snapkv", {"kv_budget": 24, "window": 8}),
    ("knorm", {"kv_budget": 24}),
    ("random", {"kv_budget": 24}),
    ("quest", {"kv_budget": 16}),
    ("streaming", {"kv_budget": 24}),
    ("sage", {"kv_budget": 24, "window": 8}),
    ("snapstream", {"kv_budget": 24, "window": 8}),
    ("h2o", {"kv_budget": 24, "window": 8}),
    ("streaming", {"kv_budget": 56}),
    ("h2o", {"kv_budget": 56, "window": 8}),  # room first, then wrap/evict
]
IDS = [f"{name}-{kw.get('kv_budget', 'all')}" for name, kw in POLICIES]


def prefilled(target, ids, n_new, policy, slack=0):
    engine = target.engine(1, policy.capacity(len(ids), n_new) + slack)
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=n_new, ignore_eos=True), policy)
    engine.scheduler.admit()
    while seq.prefilled < seq.prompt_len:
        engine.runner.prefill(seq, engine.scheduler.chunk(seq))
    return engine, seq


def decode_plain(engine, seq, tokens):
    for t in tokens:
        seq.output_ids.append(t)
        engine.runner.decode([seq])


def assert_same_cache(pool_a, slot_a, pool_b, slot_b):
    sa, sb = pool_a.slots[slot_a], pool_b.slots[slot_b]
    for name in ("fill", "written", "next_pos", "protected", "ring_next", "peak_fill"):
        assert getattr(sa, name) == getattr(sb, name), name
    for layer in range(pool_a.args.n_layers):
        ka, va, pa = pool_a.layer_entries(layer, slot_a)
        kb, vb, pb = pool_b.layer_entries(layer, slot_b)
        assert torch.equal(pa, pb), layer
        torch.testing.assert_close(ka, kb, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5)
        n = min(pool_a.layer_capacity[layer], pool_b.layer_capacity[layer])
        assert torch.equal(
            pool_a.pos[layer][slot_a, :, :n], pool_b.pos[layer][slot_b, :, :n]
        )  # stale ones too
        if pool_a.scores is not None and sa.policy.decode.accumulates_scores:
            torch.testing.assert_close(
                pool_a.scores[layer][slot_a, :, : sa.fill],
                pool_b.scores[layer][slot_b, :, : sb.fill],
                rtol=1e-4,
                atol=1e-5,
            )


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize(("name", "kwargs"), POLICIES, ids=IDS)
def test_random_rejections_leave_the_cache_of_a_plain_run(family, name, kwargs):
    target = llm(family)
    policy = target.policy(name, **kwargs)
    ids, n_new = prompt(21, 36), 40  # gemma3's 24-token windows and the 24-token budgets wrap
    tokens = prompt(22, n_new)
    plain, plain_seq = prefilled(target, ids, n_new, policy)
    decode_plain(plain, plain_seq, tokens)

    slack = 0 if policy.decode.fixed_size else 8  # ring/evict capacity must match: it sets the wrap point
    spec, spec_seq = prefilled(target, ids, n_new, policy, slack)
    slot = SpeculativeSlot(target.loaded.model, spec.pool, spec_seq.slot)
    rng = random.Random(0)
    done = 0
    while done < n_new:
        t = rng.randint(1, 5)
        keep = min(rng.randint(0, t), n_new - done)
        block = tokens[done : done + keep] + [rng.randrange(256) for _ in range(t - keep)]
        cut = rng.randint(1, t)  # sometimes several forwards before one commit, like the draft
        logits = slot.forward(block[:cut])
        if cut < t:
            logits = torch.cat([logits, slot.forward(block[cut:])])
        assert logits.shape == (t, target.loaded.args.vocab_size)
        slot.commit(keep)
        done += keep
    assert slot.block_forwards + slot.stepped_forwards > 0
    assert_same_cache(plain.pool, plain_seq.slot, spec.pool, spec_seq.slot)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("full", {}), ("sage", {"kv_budget": 24, "window": 8}), ("h2o", {"kv_budget": 24, "window": 8})],
)
def test_speculative_decoder_caches_match_plain_runs(name, kwargs):
    """End to end: after some rounds (with rejections), the target's cache equals a plain run over the
    tokens emitted so far, and the draft's cache a plain draft run over the tokens it has seen."""
    target, draft = llm(), perturbed("llama", 0.1)
    run = SpeculativeDecoder(target, draft, k=3).session(
        prompt(8, 36), max_new_tokens=40, ignore_eos=True, kv_policy=name, **kwargs
    )
    list(run.start())
    while len(run.seq.output_ids) < 25:
        list(run.round())
    out = run.seq.output_ids
    spec = run.seq.spec
    assert 0 < spec["draft_tokens_accepted"] < spec["draft_tokens_proposed"]
    policy = run.seq.policy
    plain, seq = prefilled(target, run.seq.prompt_ids, 40, policy)
    decode_plain(plain, seq, out[:-1])  # the newest token is not in the cache yet
    assert_same_cache(plain.pool, seq.slot, run.engine.pool, run.seq.slot)

    plain_d, seq_d = prefilled(draft, run.seq.prompt_ids, 40, run.draft_seq.policy)
    decode_plain(plain_d, seq_d, out[: run.draft_len - len(run.seq.prompt_ids)])
    assert_same_cache(plain_d.pool, seq_d.slot, run.draft_engine.pool, run.draft_seq.slot)
