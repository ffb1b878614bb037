import pytest
import torch

from longserve.errors import InvalidParameterError, LongserveError
from longserve.kv.policies import make_policy
from longserve.llm import LLM
from longserve.loader import LoadedModel
from longserve.spec import SpeculativeDecoder, TokenizerMismatchError
from tests.spec.helpers import llm, perturbed, plain_greedy, plain_run, prompt
from tests.tiny import ByteTokenizer


@pytest.mark.parametrize("draft", ["noisy-0.05", "noisy-0.15", "other-1layer"])
def test_greedy_equals_target_greedy_for_many_seeds_and_k(draft):
    target = llm()
    d = (
        llm("llama", 1, num_hidden_layers=1)
        if draft == "other-1layer"
        else perturbed("llama", float(draft[6:]))
    )
    full = make_policy("full")
    accepted = 0
    for seed in range(4):
        ids = prompt(seed, 5 + 9 * seed)
        expected = plain_greedy(target, ids, 24, full)
        for k in (1, 2, 3, 5):
            adaptive = (k + seed) % 2 == 1
            out = SpeculativeDecoder(target, d, k=k, adaptive=adaptive).generate(
                ids, max_new_tokens=24, ignore_eos=True
            )
            assert out.token_ids == expected, (seed, k, adaptive)
            assert out.finish_reason == "length"
            accepted += out.stats["draft_tokens_accepted"]
    if draft.startswith("noisy"):
        assert accepted > 0  # partial acceptance really happened


def test_draft_equal_to_target_accepts_everything():
    target = llm()
    ids = prompt(3, 20)
    out = SpeculativeDecoder(target, target, k=4, adaptive=False).generate(
        ids, max_new_tokens=21, ignore_eos=True
    )
    s = out.stats
    assert out.token_ids == plain_greedy(target, ids, 21, make_policy("full"))
    assert s["acceptance_rate"] == 1.0 and s["mean_accepted_length"] == 4.0
    assert s["target_forward_passes"] == 4  # 20 tokens after the first, 5 per round
    assert s["tokens_per_target_forward"] == 5.0
    assert s["draft_tokens_proposed"] == 16 and s["verify_rounds"] == 4


def test_adaptive_k_grows_on_full_acceptance_within_bounds():
    target = llm()
    out = SpeculativeDecoder(target, target, k=2, adaptive=True, k_max=5).generate(
        prompt(1, 10), max_new_tokens=40, ignore_eos=True
    )
    assert out.stats["k_final"] == 5


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("streaming", {"kv_budget": 24}),
        ("sage", {"kv_budget": 24, "window": 8}),
        ("snapstream", {"kv_budget": 24, "window": 8}),
        ("h2o", {"kv_budget": 24, "window": 8}),
        ("snapkv", {"kv_budget": 24, "window": 8}),
        ("knorm", {"kv_budget": 24}),
        ("quest", {"kv_budget": 96}),
    ],
)
def test_greedy_equals_target_under_every_policy(name, kwargs):
    target, draft = llm(), perturbed("llama", 0.05)
    ids = prompt(11, 40)
    policy = target.policy(name, **kwargs)
    expected = plain_greedy(target, ids, 30, policy)
    for k in (2, 4):
        out = SpeculativeDecoder(target, draft, k=k).generate(
            ids, max_new_tokens=30, ignore_eos=True, kv_policy=policy
        )
        assert out.token_ids == expected, k


def test_greedy_equals_target_with_sliding_window_layers():
    target, draft = llm("gemma3"), perturbed("gemma3", 0.05)
    ids = prompt(5, 30)  # the 24-token windows wrap during decoding
    for name, kwargs in (("full", {}), ("streaming", {"kv_budget": 20})):
        policy = target.policy(name, **kwargs)
        expected = plain_greedy(target, ids, 30, policy)
        out = SpeculativeDecoder(target, draft, k=3).generate(
            ids, max_new_tokens=30, ignore_eos=True, kv_policy=policy
        )
        assert out.token_ids == expected, name


def test_stop_string_ends_like_plain_decoding():
    target, draft = llm(), perturbed("llama", 0.05)
    ids = prompt(2, 12)
    text = plain_run(target, ids, 20, make_policy("full")).text
    stop = [text[6:8]]
    plain = plain_run(target, ids, 20, make_policy("full"), stop=stop)
    out = SpeculativeDecoder(target, draft, k=4).generate(ids, max_new_tokens=20, ignore_eos=True, stop=stop)
    assert plain.finish_reason == "stop"
    assert (out.text, out.finish_reason, out.token_ids) == (plain.text, "stop", plain.output_ids)


def test_stream_pieces_add_up_and_stats_count():
    target = llm()
    dec = SpeculativeDecoder(target, perturbed("llama", 0.05), k=3)
    pieces = list(dec.stream(prompt(4, 15), max_new_tokens=16, ignore_eos=True))
    assert pieces[-1].finished and not any(p.finished for p in pieces[:-1])
    seq = pieces[-1].seq
    assert "".join(p.new_text for p in pieces) == seq.text
    s = seq.stats()
    assert s["completion_tokens"] == 16
    assert s["draft_tokens_accepted"] <= s["draft_tokens_proposed"]
    assert s["target_forward_passes"] + 1 + s["draft_tokens_accepted"] == 16


def test_invalid_k_and_tokenizer_mismatch():
    target = llm()
    with pytest.raises(InvalidParameterError):
        SpeculativeDecoder(target, target, k=0)
    with pytest.raises(InvalidParameterError):
        SpeculativeDecoder(target, target, k=-2)

    class ShiftedTokenizer(ByteTokenizer):
        def encode(self, text, add_special_tokens=True):
            return [(b + 1) % 256 for b in text.encode()]

    base = target.loaded
    other = LLM(loaded=LoadedModel("other", None, base.model, ShiftedTokenizer(), base.args, base.eos_ids))
    with pytest.raises(TokenizerMismatchError, match="tokenize"):
        SpeculativeDecoder(target, other)

    class VocabTokenizer(ByteTokenizer):
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    a = LLM(
        loaded=LoadedModel("a", None, base.model, VocabTokenizer({"x": 0, "y": 1}), base.args, base.eos_ids)
    )
    b = LLM(
        loaded=LoadedModel("b", None, base.model, VocabTokenizer({"x": 1, "y": 0}), base.args, base.eos_ids)
    )
    with pytest.raises(LongserveError, match="different tokenizers"):
        SpeculativeDecoder(a, b)


def test_sampled_first_speculative_token_follows_target_distribution():
    """Vocabulary of 8: the token after the prefill's is produced by rejection sampling; its marginal must
    match the target's exact sum_t1 p(t1) p(t2 | t1) (chi-square)."""
    target = llm("llama", 0, vocab_size=8, num_hidden_layers=1)
    draft = llm("llama", 3, vocab_size=8, num_hidden_layers=1)
    ids = [1, 2, 3, 4, 5]
    model = target.loaded.model
    with torch.no_grad():
        from longserve.distill.teacher import answer_logits

        p1 = next(answer_logits(model, ids + [0], len(ids)))[1][0].softmax(-1)
        exact = torch.zeros(8)
        for t1 in range(8):
            p2 = next(answer_logits(model, [*ids, t1, 0], len(ids) + 1))[1][0].softmax(-1)
            exact += p1[t1] * p2
    dec = SpeculativeDecoder(target, draft, k=1, adaptive=False)
    n = 1000
    counts = torch.zeros(8)
    rejected = 0
    for seed in range(n):
        out = dec.generate(ids, max_new_tokens=3, temperature=1.0, seed=seed, ignore_eos=True)
        counts[out.token_ids[1]] += 1
        rejected += out.stats["draft_tokens_accepted"] == 0
    assert 0 < rejected < n  # both branches (accept and residual sampling) ran
    expected = exact * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, (chi2, counts, expected)  # p = 0.001 at 7 degrees of freedom
