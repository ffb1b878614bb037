"""Per-layer budgets (`LayerBudgetPolicy`): same total bytes, layers keep different counts, and every
layer still reads and writes at its own place (decode equals a full cache masked to what each kept)."""

import pytest
import torch

from longserve.context import CompressedContext
from longserve.engine.sampler import SamplingParams
from longserve.errors import InvalidParameterError
from longserve.eval.specs import parse_policy_spec
from longserve.kv.cache import KVPool
from longserve.kv.policies import LayerBudgetPolicy, make_policy
from longserve.kv.policies.layer_budgets import fit_counts
from longserve.llm import LLM
from tests.kv.test_policies import MaskedReference, prompt, run
from tests.tiny import tiny_loaded

N_LAYERS = 4


@pytest.fixture(scope="module")
def llm():
    loaded, _ = tiny_loaded("llama", num_hidden_layers=N_LAYERS)
    return LLM(loaded=loaded)


def per_layer_positions(pool: KVPool, slot: int) -> list[list[torch.Tensor]]:
    """Per layer, per KV head: the positions the slot holds (flat or per-head layout)."""
    out = []
    for layer in range(pool.args.n_layers):
        if pool.is_flat(layer, slot):
            _, _, pos, heads = pool.flat_entries(layer, slot)
            out.append([pos[heads == h].sort().values for h in range(pool.args.n_kv_heads)])
        else:
            out.append(list(pool.layer_entries(layer, slot)[2]))
    return out


def test_fit_counts_keeps_the_total_and_the_cap():
    assert fit_counts([1.0, 1.0, 1.0], 9, 5) == [3, 3, 3]
    assert fit_counts([10.0, 1.0, 1.0], 12, 6) == [6, 3, 3]  # clipped, the rest absorb the difference
    counts = fit_counts([0.3, 2.9, 0.0, 7.1], 10, 8)
    assert sum(counts) == 10 and max(counts) <= 8 and counts[2] == 0
    assert fit_counts([0.0, 0.0], 4, 3) == [2, 2]  # no preference: an even split


@pytest.mark.parametrize(
    "name, options",
    [
        ("snapkv", {"layer_budgets": "pyramid"}),
        ("pyramidkv", {}),
        ("kvzip", {"layer_budgets": "global"}),
        ("kvzip", {"layer_budgets": "global", "head_adaptive": True}),
    ],
)
def test_layers_keep_different_counts_in_the_same_bytes_and_decode_exactly(llm, name, options):
    ids = prompt(40, 160)
    args = llm.loaded.args
    policy = make_policy(name, budget=40, window=6, **options)
    assert policy.layer_adaptive
    engine = llm.engine(1, policy.capacity(160, 5))
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=5, ignore_eos=True), policy)
    engine.step()
    counts = engine.pool.tokens_per_layer(seq.slot)
    assert sum(counts) == 40 * N_LAYERS and len(set(counts)) > 1
    if options.get("layer_budgets", "pyramid") == "pyramid":
        assert counts == sorted(counts, reverse=True)  # lower layers keep more
    keep = per_layer_positions(engine.pool, seq.slot)
    assert all(set(range(154, 160)) <= set(k.tolist()) for layer in keep for k in layer)  # the window
    while engine.has_unfinished():
        engine.step()
    assert seq.kv_bytes_final == (40 + 4) * args.kv_bytes_per_token()  # the uniform bytes, four decode writes
    ref = MaskedReference(keep, 160).logits(llm.loaded.model, ids + seq.output_ids[:-1])[159:]
    assert ref.argmax(-1).tolist() == seq.output_ids


def test_ring_decode_keeps_each_layer_at_its_count(llm):
    ids = prompt(41, 150)
    policy = make_policy("snapstream", budget=40, window=8, layer_budgets="pyramid")
    engine = llm.engine(1, policy.capacity(150, 20))
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=20, ignore_eos=True), policy)
    engine.step()
    counts = engine.pool.tokens_per_layer(seq.slot)
    selected = [
        [k[: n - 8].clone() for k in layer]
        for layer, n in zip(per_layer_positions(engine.pool, seq.slot), counts, strict=True)
    ]
    for _ in range(18):  # the ring wraps twice over the 8-token window
        engine.step()
    assert engine.pool.tokens_per_layer(seq.slot) == counts and sum(counts) == 40 * N_LAYERS
    for layer, (before, now) in enumerate(
        zip(selected, per_layer_positions(engine.pool, seq.slot), strict=True)
    ):
        for head_before, head_now in zip(before, now, strict=True):
            assert head_now.tolist()[: len(head_before)] == head_before.tolist()  # the selection stays
            assert sorted(head_now.tolist()[len(head_before) :]) == list(range(160, 168)), layer  # the last 8
    while engine.has_unfinished():
        engine.step()
    assert seq.kv_bytes_final == 40 * llm.loaded.args.kv_bytes_per_token()


def test_budget_at_least_the_prompt_equals_full(llm):
    ids = prompt(42, 40)
    full = run(llm, ids, make_policy("full"))
    for options in ({"layer_budgets": "pyramid"}, {"layer_budgets": "global"}):
        name = "kvzip" if options["layer_budgets"] == "global" else "snapkv"
        assert run(llm, ids, make_policy(name, budget=64, window=4, **options)).output_ids == full.output_ids


@pytest.mark.parametrize("head_adaptive", [False, True])
def test_compressed_context_is_the_sum_of_its_layers_and_answers_like_the_slot(llm, tmp_path, head_adaptive):
    args = llm.loaded.args
    ctx_ids, q_ids = prompt(43, 120), prompt(44, 6)
    ctx = llm.compress(ctx_ids, "kvzip", 30, window=4, layer_budgets="global", head_adaptive=head_adaptive)
    assert (ctx.heads is not None) == head_adaptive
    lengths = [k.shape[1] for k in ctx.keys]
    assert len(set(lengths)) > 1 and sum(lengths) == 30 * N_LAYERS
    assert ctx.nbytes == 30 * args.kv_bytes_per_token()  # stored: exactly the kept entries
    answer = [o.seq.output_ids for o in llm.stream(q_ids, max_new_tokens=4, prefix=ctx, ignore_eos=True)][-1]
    keep = [
        [p.flatten()[h.flatten() == head].sort().values for head in range(args.n_kv_heads)]
        if head_adaptive
        else list(p)
        for p, h in zip(ctx.positions, ctx.heads or ctx.positions, strict=True)
    ]
    ref = MaskedReference(keep, 120).logits(llm.loaded.model, ctx_ids + q_ids + answer[:-1])
    assert ref[120 + len(q_ids) - 1 :].argmax(-1).tolist() == answer
    ctx.save(tmp_path / "c.safetensors")
    loaded = CompressedContext.load(tmp_path / "c.safetensors", llm.fingerprint)
    again = [o.seq.output_ids for o in llm.stream(q_ids, max_new_tokens=4, prefix=loaded, ignore_eos=True)]
    assert again[-1] == answer
    # an engine built for the context stores each layer at its own size: physically the sum
    shift = loaded.layer_shift(args.layer_windows)
    pool = KVPool(args, 1, loaded.fill + 10, layer_shift=shift)
    assert pool.nbytes() == (30 + 10) * args.kv_bytes_per_token()


def test_bad_layer_budgets_say_so():
    with pytest.raises(InvalidParameterError, match="layer_budgets must be one of"):
        make_policy("snapkv", budget=32, layer_budgets="sideways")
    with pytest.raises(InvalidParameterError, match="scoring pass"):
        make_policy("snapkv", budget=32, layer_budgets="global")
    with pytest.raises(InvalidParameterError, match="not supported by policy 'h2o'"):
        make_policy("h2o", budget=32, layer_budgets="pyramid")
    with pytest.raises(InvalidParameterError, match="layer_cap must be >= 1"):
        make_policy("snapkv", budget=32, layer_budgets="pyramid", layer_cap=0.5)
    with pytest.raises(InvalidParameterError, match="already has them"):
        LayerBudgetPolicy(make_policy("pyramidkv", budget=32))
    assert make_policy("snapkv", budget=32, layer_budgets="uniform") == make_policy("snapkv", budget=32)


def test_a_layer_adaptive_context_is_not_compressed_again(llm):
    ctx = llm.compress(prompt(45, 100), "kvzip", 30, window=4, layer_budgets="global")
    engine = llm.engine(1, 200)
    policy = make_policy("snapkv", budget=40, window=4)
    with pytest.raises(InvalidParameterError, match="cannot be compressed again"):
        seq = engine.add_request(prompt(46, 60), SamplingParams(max_new_tokens=2), policy, prefix=ctx)
        while engine.has_unfinished():
            engine.step()
        assert seq is None


def test_names_and_specs_rebuild_the_same_policy():
    policy = make_policy("pyramidkv", ratio=0.25)
    assert policy.describe()["layer_budgets"] == "pyramid"
    assert make_policy(**policy.describe()) == policy
    spec = parse_policy_spec("kvzip@0.25:layer_budgets=global:head_adaptive=true")
    built = make_policy(spec.kv_policy, ratio=spec.kv_ratio, **spec.kwargs)
    assert built.layer_adaptive and built.head_adaptive
    assert parse_policy_spec("pyramidkv@64").kv_policy == "pyramidkv"
