"""Head-adaptive budgets (AdaKV): one top-k over a layer's heads, same bytes, per-head counts differ."""

import pytest
import torch

from longserve.context import CompressedContext
from longserve.engine.sampler import SamplingParams
from longserve.errors import InvalidParameterError
from longserve.kv.attention import PrefillBackend
from longserve.kv.cache import KVPool
from longserve.kv.policies import REGISTRY, make_policy
from longserve.llm import LLM
from tests.kv.test_policies import MaskedReference, prompt, run
from tests.tiny import tiny_loaded


def can_adapt(cls) -> bool:
    """AdaKV needs a scored selection at prefill, no per-token eviction, and a recent window."""
    window = cls.__dataclass_fields__["window"].default
    return cls.compresses and not cls.decode.accumulates_scores and window > 0


ADAPTABLE = [name for name, cls in REGISTRY.items() if can_adapt(cls)]
NOT_ADAPTABLE = [name for name, cls in REGISTRY.items() if not can_adapt(cls)]


@pytest.fixture(scope="module")
def llm():
    loaded, _ = tiny_loaded("llama", num_hidden_layers=2)
    return LLM(loaded=loaded)


def kept_per_head(engine, slot, n_layers, n_heads, below: int):
    """Per layer, per KV head: the prompt positions a flat slot holds for that head."""
    out = []
    for layer in range(n_layers):
        _, _, pos, heads = engine.pool.flat_entries(layer, slot)
        out.append([pos[(heads == h) & (pos < below)].sort().values for h in range(n_heads)])
    return out


def test_heads_keep_different_counts_in_the_same_bytes(llm):
    ids = prompt(10, 200)
    args = llm.loaded.args
    uniform = make_policy("snapkv", budget=48, window=8)
    adaptive = make_policy("snapkv", budget=48, window=8, head_adaptive=True)
    engine = llm.engine(1, adaptive.capacity(200, 3))
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=3, ignore_eos=True), adaptive)
    engine.step()
    kept = kept_per_head(engine, seq.slot, args.n_layers, args.n_kv_heads, 200)
    counts = [[len(k) for k in layer] for layer in kept]
    assert all(sum(c) == 48 * args.n_kv_heads for c in counts)  # the layer's total is the uniform total
    assert any(len(set(c)) > 1 for c in counts)  # but heads keep different numbers of tokens
    for layer in kept:  # every head keeps the window
        assert all(set(range(192, 200)) <= set(k.tolist()) for k in layer)
    while engine.has_unfinished():
        engine.step()
    # two decode tokens were written (the third is never fed back): each head holds them too
    assert seq.stats()["kv_tokens_per_head"] == [[len(k) + 2 for k in layer] for layer in kept]
    base = run(llm, ids, uniform, n=3)
    assert seq.kv_bytes_allocated == base.kv_bytes_allocated == (48 + 3) * args.kv_bytes_per_token()
    assert seq.kv_bytes_final == base.kv_bytes_final


@pytest.mark.parametrize("name", [n for n in ADAPTABLE if not REGISTRY[n].decode.fixed_size])
def test_decode_equals_a_full_cache_masked_per_head(llm, name):
    """Every head attends exactly to the tokens the flat slot tagged with it, at original positions."""
    ids = prompt(11, 90)
    args = llm.loaded.args
    policy = make_policy(name, budget=30, window=6, head_adaptive=True)
    engine = llm.engine(1, policy.capacity(90, 5))
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=5, ignore_eos=True), policy)
    engine.step()
    keep = kept_per_head(engine, seq.slot, args.n_layers, args.n_kv_heads, 90)
    while engine.has_unfinished():
        engine.step()
    ref = MaskedReference(keep, 90).logits(llm.loaded.model, ids + seq.output_ids[:-1])[89:]
    assert ref.argmax(-1).tolist() == seq.output_ids


@pytest.mark.parametrize("name", ["snapkv", "sage", "snapstream"])
def test_budget_at_least_prompt_equals_full(llm, name):
    ids = prompt(12, 40)
    full = run(llm, ids, make_policy("full"))
    assert (
        run(llm, ids, make_policy(name, budget=64, window=8, head_adaptive=True)).output_ids
        == full.output_ids
    )


def test_ring_decode_keeps_the_budget(llm):
    ids = prompt(13, 150)
    policy = make_policy("snapstream", budget=40, window=8, head_adaptive=True)
    seq = run(llm, ids, policy, n=20)  # the ring wraps twice over the 8-token window
    assert seq.kv_bytes_allocated == 40 * llm.loaded.args.kv_bytes_per_token()
    assert seq.stats()["kv_tokens_final"] == 40


def test_mixed_batch_equals_separate_runs(llm):
    """Flat (adaptive) and per-head slots decode together without disturbing each other."""
    policies = [
        make_policy("snapkv", budget=40, window=8, head_adaptive=True),
        make_policy("snapkv", budget=40, window=8),
        make_policy("sage", budget=40, window=8, head_adaptive=True),
        make_policy("full"),
    ]
    prompts = [prompt(20 + i, 120) for i in range(len(policies))]
    alone = [run(llm, ids, p, n=6).output_ids for ids, p in zip(prompts, policies, strict=True)]
    engine = llm.engine(len(policies), 130)
    seqs = [
        engine.add_request(ids, SamplingParams(max_new_tokens=6, ignore_eos=True), p)
        for ids, p in zip(prompts, policies, strict=True)
    ]
    while engine.has_unfinished():
        engine.step()
    assert [s.output_ids for s in seqs] == alone


def test_compressed_context_round_trip_and_ask(llm, tmp_path):
    """Query-agnostic: an adaptive context answers like a full cache masked to what it kept, also
    after save and load."""
    args = llm.loaded.args
    ctx_ids, q_ids = prompt(30, 100), prompt(31, 7)
    ctx = llm.compress(ctx_ids, "snapkv", 32, window=8, head_adaptive=True)
    assert ctx.heads is not None and ctx.nbytes == 32 * args.kv_bytes_per_token()
    answer = [o.seq.output_ids for o in llm.stream(q_ids, max_new_tokens=4, prefix=ctx, ignore_eos=True)][-1]
    ctx.save(tmp_path / "c.safetensors")
    loaded = CompressedContext.load(tmp_path / "c.safetensors", llm.fingerprint)
    again = [o.seq.output_ids for o in llm.stream(q_ids, max_new_tokens=4, prefix=loaded, ignore_eos=True)][
        -1
    ]
    assert again == answer
    keep = [
        [
            ctx.positions[layer].flatten()[ctx.heads[layer].flatten() == h].sort().values
            for h in range(args.n_kv_heads)
        ]
        for layer in range(args.n_layers)
    ]
    ref = MaskedReference(keep, 100).logits(llm.loaded.model, ctx_ids + q_ids + answer[:-1])
    assert ref[100 + len(q_ids) - 1 :].argmax(-1).tolist() == answer
    # the question's own logits, read straight from the backend, equal the reference's
    pool = KVPool(args, 1, 120)
    slot = pool.allocate(make_policy("full"))
    loaded.load_into(pool, slot)
    positions = torch.arange(100, 100 + len(q_ids))
    with torch.no_grad():
        got = llm.loaded.model(
            torch.tensor([q_ids]), positions[None], PrefillBackend(pool, slot, positions), last_only=False
        )[0]
    torch.testing.assert_close(got, ref[100 : 100 + len(q_ids)], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NOT_ADAPTABLE)
def test_policies_that_cannot_adapt_say_so(name):
    with pytest.raises(InvalidParameterError, match="head_adaptive"):
        make_policy(name, budget=64, head_adaptive=True)


def test_sliding_window_layers_keep_their_ring():
    """Gemma3: only the global layers go flat; the sliding layers keep their per-head ring."""
    loaded, _ = tiny_loaded("gemma3", num_hidden_layers=4)
    gemma = LLM(loaded=loaded)
    ids = prompt(40, 150)
    adaptive = run(gemma, ids, make_policy("snapstream", budget=40, window=8, head_adaptive=True), n=6)
    uniform = run(gemma, ids, make_policy("snapstream", budget=40, window=8), n=6)
    assert adaptive.kv_bytes_allocated == uniform.kv_bytes_allocated
    assert adaptive.kv_tokens_per_layer == uniform.kv_tokens_per_layer
    assert len(adaptive.kv_tokens_per_head) == sum(1 for w in gemma.loaded.args.layer_windows if not w)
