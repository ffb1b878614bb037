"""Expected attention: RoPE moves of post-RoPE vectors, the query statistics against a direct
computation with the model's own RoPE tables, the engine path, and its errors."""

import pytest
import torch

from longserve.engine.sampler import SamplingParams
from longserve.errors import InvalidParameterError
from longserve.kv.policies import ScoreInputs, make_policy
from longserve.kv.policies.expected_attention import ExpectedAttentionPolicy
from longserve.llm import LLM
from longserve.model.transformer import apply_rope
from tests.kv.test_policies import MaskedReference, prompt
from tests.tiny import tiny_loaded


@pytest.fixture(scope="module")
def llm():
    loaded, _ = tiny_loaded("llama", num_hidden_layers=2)
    return LLM(loaded=loaded)


def rope_at(model, positions, x):
    cos, sin = model.rope(torch.as_tensor(positions)[None], torch.float32)[0]
    return apply_rope(x, cos[0, 0], sin[0, 0])


def inputs_for(model, q_pre, keys, values, positions):
    """ScoreInputs as the prefill backend builds them: queries rotated at the last positions."""
    tq = q_pre.shape[1]
    q = rope_at(model, positions[-tq:], q_pre)
    return ScoreInputs(0, q, keys, values, positions, 0.25, inv_freq=model.layer_inv_freq(0))


def test_rotate_undoes_and_composes_rope(llm):
    model = llm.loaded.model
    x = torch.randn(4, 10, 16)
    pos = torch.arange(30, 40)
    post = rope_at(model, pos, x)
    inputs = ScoreInputs(0, post, x, x, pos, 0.25, inv_freq=model.layer_inv_freq(0))
    torch.testing.assert_close(inputs.rotate(post, -pos), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        inputs.rotate(post, pos * 0 + 7), rope_at(model, pos + 7, x), atol=1e-5, rtol=1e-5
    )


def test_mean_only_score_is_the_softmax_of_the_moved_mean_query(llm):
    """n_future=1, no covariance, no value norm: each recent query moved to the next position, averaged,
    softmaxed against the keys, averaged over the group: computed here with the model's RoPE tables."""
    model = llm.loaded.model
    torch.manual_seed(0)
    q_pre, keys, values = torch.randn(4, 12, 16), torch.randn(2, 40, 16), torch.randn(2, 40, 16)
    positions = torch.arange(40)
    policy = ExpectedAttentionPolicy(budget=10, n_future=1, use_covariance=False, use_vnorm=False)
    got = policy.score(inputs_for(model, q_pre, keys, values, positions))
    moved = rope_at(model, torch.full((12,), 40), q_pre).mean(1)  # [Hq, D] at position 40
    logits = (keys.repeat_interleave(2, 0) @ moved[:, :, None])[..., 0] * 0.25
    logits[:, :4] = float("-inf")
    want = logits.softmax(-1).view(2, 2, 40).mean(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_covariance_term_and_value_norm(llm):
    model = llm.loaded.model
    torch.manual_seed(1)
    q_pre = torch.randn(4, 30, 16) * 0.1 + torch.randn(4, 1, 16)
    keys, values = torch.randn(2, 60, 16), torch.randn(2, 60, 16)
    inputs = inputs_for(model, q_pre, keys, values, torch.arange(60))
    policy = ExpectedAttentionPolicy(budget=10, n_future=1, use_vnorm=False)
    mean, cov = policy.query_statistics(inputs)
    centred = q_pre - q_pre.mean(1, keepdim=True)
    raw_cov = centred.transpose(1, 2) @ centred / 30
    # R Sigma R^T for the rotation to position 60, via the model's own RoPE on each basis vector
    basis = torch.eye(16).expand(4, 16, 16)
    rot = rope_at(model, torch.full((16,), 60), basis).transpose(1, 2)  # columns: R e_i
    torch.testing.assert_close(cov, rot @ raw_cov @ rot.transpose(1, 2), atol=1e-5, rtol=1e-4)
    kg = keys.repeat_interleave(2, 0)
    logits = (kg @ mean[:, :, None])[..., 0] * 0.25 + ((kg @ cov) * kg).sum(-1) * 0.25**2 / 2
    logits[:, :4] = float("-inf")
    want = logits.softmax(-1).view(2, 2, 60).mean(1)
    torch.testing.assert_close(policy.score(inputs), want, atol=1e-5, rtol=1e-4)
    with_norm = ExpectedAttentionPolicy(budget=10, n_future=1).score(inputs)
    torch.testing.assert_close(with_norm, want * values.norm(dim=-1), atol=1e-5, rtol=1e-4)


def test_engine_path_keeps_sinks_and_decodes_at_original_positions(llm):
    ids = prompt(3, 90)
    policy = make_policy("expected_attention", budget=30)
    engine = llm.engine(1, policy.capacity(90, 4))
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=4, ignore_eos=True), policy)
    engine.step()
    kept = [engine.pool.pos[layer][seq.slot, :, :30].clone() for layer in range(2)]
    assert all((k[:, :4] == torch.arange(4)).all() for k in kept)
    while engine.has_unfinished():
        engine.step()
    ref = MaskedReference(kept, 90).logits(llm.loaded.model, ids + seq.output_ids[:-1])[89:]
    assert ref.argmax(-1).tolist() == seq.output_ids
    ctx = llm.compress(ids, kv_policy="expected_attention", kv_ratio=0.5)
    assert ctx.fill == 45 and ctx.nbytes == 45 * llm.loaded.args.kv_bytes_per_token()


def test_errors():
    with pytest.raises(InvalidParameterError, match="n_future >= 1"):
        make_policy("expected_attention", budget=64, n_future=0)
    with pytest.raises(InvalidParameterError, match=r"ratio must be in \(0, 1\]"):
        make_policy("expected_attention", ratio=2.0)
    with pytest.raises(InvalidParameterError, match="exceed the kv budget"):
        make_policy("expected_attention", budget=3)
    inputs = ScoreInputs(
        0, torch.zeros(4, 3, 16), torch.zeros(2, 8, 16), torch.zeros(2, 8, 16), torch.arange(8), 0.25
    )
    with pytest.raises(InvalidParameterError, match="RoPE frequencies"):
        ExpectedAttentionPolicy(budget=6).score(inputs)
