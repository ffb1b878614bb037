"""Sampling on hand-made logits: each filter keeps exactly the tokens it should, and seeds reproduce."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from longserve.engine.sampler import SamplingParams, filter_logits, penalize, sample
from longserve.engine.sequence import Sequence
from longserve.errors import InvalidParameterError
from longserve.kv.policies import FullPolicy

#: Probabilities 0.5, 0.3, 0.1, 0.06, 0.04 at temperature 1; the order is shuffled so no test can pass by
#: accidentally favouring low ids.
PROBS = torch.tensor([0.06, 0.5, 0.04, 0.3, 0.1])
LOGITS = PROBS.log()
DRAWS = 3000


def generator(seed: int | None, temperature: float = 1.0) -> torch.Generator:
    """The generator a sequence gets for these params, so the tests exercise the engine's seeding."""
    return Sequence([0], SamplingParams(temperature=temperature, seed=seed), FullPolicy()).generator


def draw(
    params: SamplingParams, gen: torch.Generator, n: int = DRAWS, logits: torch.Tensor = LOGITS
) -> list[int]:
    return [sample(logits[None], [params], [gen])[0] for _ in range(n)]


def test_greedy_takes_each_rows_argmax_without_a_generator():
    logits = torch.stack([LOGITS, LOGITS.flip(0), torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0])])
    params = [SamplingParams()] * 3
    assert params[0].greedy
    assert sample(logits, params, [None] * 3) == [1, 3, 4]


def test_temperature_one_samples_the_softmax():
    counts = Counter(draw(SamplingParams(temperature=1.0), generator(0)))
    for token, p in enumerate(PROBS.tolist()):
        assert abs(counts[token] / DRAWS - p) < 0.03, (token, counts)


def test_temperature_scales_the_logits():
    for temperature in (0.25, 2.0):
        probs = filter_logits(LOGITS, SamplingParams(temperature=temperature))
        assert torch.allclose(probs, (LOGITS / temperature).softmax(-1))
    cold = Counter(draw(SamplingParams(temperature=0.05), generator(1), n=500))
    assert cold[1] == 500  # (0.3 / 0.5) ** 20 ~ 4e-5: the argmax every time
    hot = Counter(draw(SamplingParams(temperature=5.0), generator(2)))
    assert all(hot[t] > 0.1 * DRAWS for t in range(5)), hot  # near-uniform: every token often


@pytest.mark.parametrize("top_k, kept", [(1, {1}), (2, {1, 3}), (3, {1, 3, 4})])
def test_top_k_never_samples_outside_the_k_most_likely(top_k, kept):
    probs = filter_logits(LOGITS, SamplingParams(temperature=1.0, top_k=top_k))
    assert {i for i, p in enumerate(probs.tolist()) if p > 0} == kept
    assert torch.allclose(probs[list(kept)], PROBS[list(kept)] / PROBS[list(kept)].sum())
    # a hot temperature makes the excluded tokens likely if the filter leaked
    assert set(draw(SamplingParams(temperature=5.0, top_k=top_k), generator(3))) == kept


def test_top_k_larger_than_the_vocabulary_keeps_everything():
    probs = filter_logits(LOGITS, SamplingParams(temperature=1.0, top_k=50))
    assert torch.allclose(probs, PROBS)


@pytest.mark.parametrize(
    "top_p, kept", [(0.4, {1}), (0.7, {1, 3}), (0.85, {1, 3, 4}), (1.0, {0, 1, 2, 3, 4})]
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = filter_logits(LOGITS, SamplingParams(temperature=1.0, top_p=top_p))
    assert {i for i, p in enumerate(probs.tolist()) if p > 0} == kept
    assert torch.allclose(probs[list(kept)], PROBS[list(kept)] / PROBS[list(kept)].sum())
    assert set(draw(SamplingParams(temperature=1.0, top_p=top_p), generator(4))) == kept


def test_top_k_and_top_p_combine():
    """top-k first (two tokens: 0.625/0.375 renormalised), then top_p=0.6 keeps only the first."""
    params = SamplingParams(temperature=1.0, top_k=2, top_p=0.6)
    assert set(draw(params, generator(5), n=500)) == {1}


def test_same_seed_same_tokens_different_seed_different_tokens():
    params = SamplingParams(temperature=1.0, seed=1234)
    first = draw(params, generator(1234), n=200)
    assert draw(params, generator(1234), n=200) == first
    assert draw(params, generator(1235), n=200) != first
    assert len(set(first)) > 1  # not trivially equal: the draws really vary


def test_unseeded_sequences_differ():
    params = SamplingParams(temperature=1.0)
    assert draw(params, generator(None), n=200) != draw(params, generator(None), n=200)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1"),
        ({"temperature": -0.1}, "temperature must be >= 0 and finite"),
        ({"temperature": float("inf")}, "temperature must be >= 0 and finite"),
        ({"temperature": float("nan")}, "temperature must be >= 0 and finite"),
        ({"temperature": "hot"}, "temperature must be >= 0 and finite"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_p": float("nan")}, "top_p must be in (0, 1]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 2.0}, "top_k must be an integer >= 0"),
        ({"seed": -1}, "seed must be an integer in [0, 2**63)"),
        ({"seed": 2**63}, "seed must be an integer in [0, 2**63)"),
        ({"seed": 2**70}, "seed must be an integer in [0, 2**63)"),
        ({"seed": 1.5}, "seed must be an integer in [0, 2**63)"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"presence_penalty": float("nan")}, "presence_penalty must be in [-2, 2]"),
        ({"frequency_penalty": -2.01}, "frequency_penalty must be in [-2, 2]"),
        ({"frequency_penalty": "x"}, "frequency_penalty must be in [-2, 2]"),
    ],
)
def test_invalid_params_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(**kwargs)
    assert str(err.value).startswith(message) and repr(next(iter(kwargs.values()))) in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"temperature": 0},
        {"top_p": 1},
        {"top_k": 0},
        {"temperature": 2},
        {"presence_penalty": -2},
        {"frequency_penalty": 2},
    ],
)
def test_boundary_params_are_accepted_and_the_largest_seed_seeds_a_generator(kwargs):
    params = SamplingParams(**kwargs)
    if params.seed is not None:
        assert generator(params.seed).initial_seed() == params.seed


# ---- presence / frequency penalties (OpenAI: logits[t] -= presence * (count > 0) + frequency * count) ----


def test_penalties_subtract_presence_once_and_frequency_per_occurrence():
    logits = torch.zeros(5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = penalize(logits, params, [1, 1, 1, 3])
    assert out.tolist() == [0.0, -(0.5 + 0.75), 0.0, -(0.5 + 0.25), 0.0]
    assert penalize(logits, SamplingParams(presence_penalty=-1.0), [4]).tolist() == [0, 0, 0, 0, 1.0]
    assert penalize(logits, params, []).tolist() == [0.0] * 5  # nothing generated yet: nothing to penalize


def test_a_penalty_changes_the_greedy_choice_and_only_for_its_own_row():
    logits = torch.tensor([[0.0, 2.0, 1.9, 0.0]] * 2)
    params = [SamplingParams(frequency_penalty=0.2), SamplingParams()]
    assert sample(logits, params, [None, None], [[1], [1]]) == [2, 1]
    assert sample(logits, params, [None, None], [[2], [2]]) == [1, 1]  # the penalized token was not 1


def test_penalties_shift_sampled_frequencies():
    """Token 1 (p=0.5) generated 4 times with frequency_penalty 1 loses e**4 of its odds."""
    params = SamplingParams(temperature=1.0, frequency_penalty=1.0, seed=7)
    gen = generator(7)
    draws = Counter(sample(LOGITS[None], [params], [gen], [[1, 1, 1, 1]])[0] for _ in range(DRAWS))
    expected = PROBS.clone()
    expected[1] *= torch.exp(torch.tensor(-4.0))
    expected /= expected.sum()
    for token, p in enumerate(expected.tolist()):
        assert abs(draws[token] / DRAWS - p) < 0.03, (token, draws)


# ---- constraints (a grammar's token mask) ----------------------------------------------------------------


class OnlyThese:
    """A constraint allowing a fixed set of tokens; records what it was advanced with."""

    def __init__(self, allowed: set[int]):
        self.allowed_ids, self.accepted = allowed, []

    def allowed(self, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[list(self.allowed_ids)] = True
        return mask

    def accept(self, token: int) -> None:
        self.accepted.append(token)


def test_a_constraint_masks_greedy_and_sampled_rows_and_is_advanced():
    greedy, hot = OnlyThese({2, 4}), OnlyThese({0, 2})
    params = [SamplingParams(), SamplingParams(temperature=5.0)]
    gens = [None, generator(9, 5.0)]
    picks = [sample(LOGITS[None].repeat(2, 1), params, gens, None, [greedy, hot]) for _ in range(300)]
    assert {p[0] for p in picks} == {4}  # the argmax (1) is masked: the best allowed token is 4
    assert {p[1] for p in picks} == {0, 2}  # hot sampling never leaks outside the mask
    assert greedy.accepted == [p[0] for p in picks] and hot.accepted == [p[1] for p in picks]


def test_each_sequence_gets_its_own_matcher_from_a_shared_grammar():
    class CountingGrammar:
        def __init__(self):
            self.made = []

        def matcher(self):
            self.made.append(OnlyThese({1}))
            return self.made[-1]

    grammar = CountingGrammar()
    params = SamplingParams(grammar=grammar)
    seqs = [Sequence([0], params, FullPolicy()) for _ in range(3)]
    assert [s.constraint for s in seqs] == grammar.made and len({id(m) for m in grammar.made}) == 3
