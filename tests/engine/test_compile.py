"""The compiled decode step (fixed-size and append policies) against the eager step, on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from longserve.engine.compiled_decode import COMPILE_MODES, StepCompiler, eligible, pool_capacity
from longserve.engine.engine import LLMEngine
from longserve.engine.sampler import SamplingParams
from longserve.kv.policies import make_policy
from tests.tiny import tiny_loaded


def decode_tokens(loaded, compiler, policy_name: str, steps: int = 10):
    """Greedy tokens of two prompts (one shorter than the budget, so its slot still grows) decoded
    together, first in slot order, then in reverse (non-contiguous slots: attention gathers them)."""
    policy = make_policy(policy_name, budget=48, window=8)
    engine = LLMEngine(loaded, 2, policy.capacity(120, 2 * steps + 2), max_tokens=2048, compiler=compiler)
    params = SamplingParams(max_new_tokens=2 * steps + 2, ignore_eos=True)
    seqs = [engine.add_request(list(range(3, 3 + n)), params, policy) for n in (100, 30)]
    for seq in seqs:
        seq.output_ids.append(int(engine.prefill(seq).argmax()))
    all_logits = []
    for order in (seqs, seqs[::-1]):
        for _ in range(steps):
            logits = engine.runner.decode(order)
            all_logits.append(logits)
            for seq, token in zip(order, logits.argmax(-1).tolist(), strict=True):
                seq.output_ids.append(token)
    return [s.output_ids for s in seqs], torch.cat(all_logits)


@pytest.mark.slow
@pytest.mark.parametrize(("policy", "limit"), [("snapstream", 48), ("full", 142)])
def test_compiled_step_matches_eager_tokens(policy, limit):
    """Gemma3 tiny: sliding (ring) and global layers, under a ring policy (the slot reads its budget)
    and `full` (the slot grows: it reads its whole capacity, 120 + 22 new tokens, under the mask). Same
    greedy tokens, logits to fp tolerance, and the compiled graphs really ran: one bucket for the
    contiguous order, one for the reversed; the growing fill never made another."""
    loaded, _ = tiny_loaded("gemma3")
    eager_tokens, eager_logits = decode_tokens(loaded, None, policy)
    compiler = StepCompiler(loaded.model)
    tokens, logits = decode_tokens(loaded, compiler, policy)
    assert tokens == eager_tokens
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)
    assert sorted(key[:3] for key in compiler.steps) == [(2, False, limit), (2, True, limit)]
    # a second engine over the same model and pool shapes reuses the graphs: no new bucket
    assert decode_tokens(loaded, compiler, policy)[0] == eager_tokens
    assert len(compiler.steps) == 2


def test_scored_policies_fall_back_to_eager():
    """H2O (evict by accumulated scores) and Quest (page selection) need what the static step does not
    keep: never compiled, same tokens as eager."""
    loaded, _ = tiny_loaded("llama", num_hidden_layers=1)
    for name in ("h2o", "quest"):
        compiler = StepCompiler(loaded.model)
        eager = decode_tokens(loaded, None, name, steps=3)[0]
        assert decode_tokens(loaded, compiler, name, steps=3)[0] == eager
        assert compiler.steps == {}


def test_eligibility_by_plan():
    loaded, _ = tiny_loaded("llama", num_hidden_layers=1)
    engine = LLMEngine(loaded, 3, 64, max_tokens=2048)
    seqs = [
        engine.add_request(
            list(range(3, 40)), SamplingParams(max_new_tokens=4), make_policy(name, budget=16, window=4)
        )
        for name in ("streaming", "full", "h2o")
    ]
    for seq in seqs:
        engine.prefill(seq)
    pool = engine.pool
    ring, full, h2o = (s.slot for s in seqs)
    assert eligible(pool.plan_decode([ring]))
    assert eligible(pool.plan_decode([full]))
    assert eligible(pool.plan_decode([ring, full]))
    assert not eligible(pool.plan_decode([h2o]))
    assert not eligible(pool.plan_decode([ring, h2o]))  # one scored row makes the batch eager


def test_pool_capacity_ladder():
    """Rounded up to 256, 384, 512, 768, 1024...: never below the request, under 1.5x above it past the
    minimum, capped by the model's window unless the request itself is past it."""
    assert [pool_capacity(n) for n in (1, 256, 257, 500, 513, 1002, 1025, 8170)] == [
        256,
        256,
        384,
        512,
        768,
        1024,
        1536,
        8192,
    ]
    for n in range(200, 20000, 37):
        assert n <= pool_capacity(n) < max(256, 1.5 * n)
    assert pool_capacity(8170, max_tokens=8000) == 8170
    assert pool_capacity(5000, max_tokens=6000) == 6000


@pytest.mark.slow
def test_generate_calls_of_other_lengths_share_one_graph():
    """`LLM(compile=True).generate` under `full`: two calls whose prompts differ in length get pools of
    one rounded shape, so the second call runs the first one's graph (dynamo compiles no new graph), and
    both give the eager tokens."""
    from torch._dynamo.utils import counters

    from longserve import LLM

    loaded, _ = tiny_loaded("llama", num_hidden_layers=2)
    prompts = [list(range(5, 65)), list(range(7, 107))]
    opts = dict(kv_policy="full", max_new_tokens=8, ignore_eos=True)
    eager = [LLM(loaded=loaded).generate(p, **opts)[0].token_ids for p in prompts]
    llm = LLM(loaded=loaded, compile=True)
    first = llm.generate(prompts[0], **opts)[0].token_ids
    graphs = counters["stats"]["unique_graphs"]
    second = llm.generate(prompts[1], **opts)[0].token_ids
    assert [first, second] == eager
    assert len(llm.compiler.steps) == 1
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_llm_compile_option_generates_eager_tokens():
    """`LLM(compile=True)`: the same completions as eager, through the public API, for a batch."""
    from longserve import LLM

    loaded, _ = tiny_loaded("llama", num_hidden_layers=2)
    prompts = [list(range(5, 95)), list(range(9, 99))]
    opts = dict(kv_policy="streaming", kv_budget=40, window=8, max_new_tokens=12, ignore_eos=True)
    eager = LLM(loaded=loaded).generate(prompts, **opts)
    llm = LLM(loaded=loaded, compile=True)
    compiled = llm.generate(prompts, **opts)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    assert llm.compiler.steps  # the compiled graph ran


@pytest.mark.slow
def test_weight_edit_after_compile_is_not_stale():
    """A weight changed in place after compiling makes the fused copies inexact: the compiled step
    must then follow the edited weights (it recompiles on the unfused path), like eager does."""
    loaded, _ = tiny_loaded("llama", num_hidden_layers=1)
    compiler = StepCompiler(loaded.model)
    decode_tokens(loaded, compiler, "streaming", steps=2)
    with torch.no_grad():
        loaded.model.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
        loaded.model.model.layers[0].mlp.up_proj.weight.mul_(-2.0)
    eager_tokens, eager_logits = decode_tokens(loaded, None, "streaming", steps=2)
    tokens, logits = decode_tokens(loaded, compiler, "streaming", steps=2)
    assert tokens == eager_tokens
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)


def test_generate_compile_flag_reaches_llm(monkeypatch):
    """`longserve generate --compile` builds `LLM(compile=True)` (and the default stays eager)."""
    from longserve.cli import main

    seen = []

    def fake_llm(model, **kwargs):
        seen.append(kwargs["compile"])
        raise SystemExit(0)  # stop before any model loads

    monkeypatch.setattr("longserve.llm.LLM", fake_llm)
    cases = (
        (["generate", "hi", "--compile"], True),
        (["generate", "hi"], False),
    )
    for argv, expected in cases:
        with pytest.raises(SystemExit):
            main(argv)
        assert seen[-1] is expected


@pytest.mark.slow
def test_compiled_step_runs_int8_weights():
    """Quantized linears (no fused copies) compile on the unfused path and match eager."""
    from longserve.model.quant import quantize

    loaded, _ = tiny_loaded("llama", num_hidden_layers=1)
    quantize(loaded.model, "int8")
    eager_tokens, eager_logits = decode_tokens(loaded, None, "streaming", steps=3)
    compiler = StepCompiler(loaded.model)
    tokens, logits = decode_tokens(loaded, compiler, "streaming", steps=3)
    assert tokens == eager_tokens and compiler.steps
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)


def test_compile_modes():
    """A named mode reaches the compiler (a mode with options is spelled out as options: torch.compile
    takes one or the other); an unknown name is a one-line error before anything compiles."""
    from longserve import LLM
    from longserve.errors import InvalidParameterError

    loaded, _ = tiny_loaded("llama", num_hidden_layers=1)
    llm = LLM(loaded=loaded, compile="autotune")
    assert llm.compiler.mode is None
    assert llm.compiler.options["freezing"] and llm.compiler.options["max_autotune"]
    assert LLM(loaded=loaded, compile=True).compiler.options is None
    assert LLM(loaded=loaded, compile="freezing").compiler.options == COMPILE_MODES["freezing"][1]
    with pytest.raises(InvalidParameterError, match="compile mode must be one of default, freezing"):
        LLM(loaded=loaded, compile="fast")


@pytest.mark.slow
def test_every_bucket_compiles_past_the_recompile_limit(monkeypatch):
    """Each bucket gets its own code object, so dynamo's recompile limit (here 1) never turns a new
    bucket, of this compiler or of another in the process, into a silent eager run."""
    from torch._dynamo.utils import counters

    loaded, _ = tiny_loaded("llama", num_hidden_layers=1)
    eager = decode_tokens(loaded, None, "streaming", steps=2)[0]
    compilers = [StepCompiler(loaded.model) for _ in range(2)]
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)  # after the compilers are made
    before = counters["stats"]["unique_graphs"]
    for compiler in compilers:  # two compilers, two buckets each (contiguous and reversed slots)
        assert decode_tokens(loaded, compiler, "streaming", steps=2)[0] == eager
        assert len(compiler.steps) == 2
    assert counters["stats"]["unique_graphs"] - before == 4
