"""SAGE-KV's scorer: the last `n_queries` prompt queries vote (1 is the paper's last token only), and
its parameters are checked. The degeneration it fixes is reproduced on a real model in
tests/kv/test_sage_smollm2.py."""

import pytest
import torch
import torch.nn.functional as F

from longserve.errors import InvalidParameterError
from longserve.kv.policies import ScoreInputs, make_policy


def inputs(n_q: int = 12, length: int = 40) -> ScoreInputs:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, n_q, 16, generator=gen) * 2, torch.randn(2, length, 16, generator=gen) * 2
    return ScoreInputs(0, q, k, torch.randn(2, length, 16, generator=gen), torch.arange(length), 0.25)


def by_hand(x: ScoreInputs, n: int) -> torch.Tensor:
    """Mean over each KV head's query group of the causal softmax of the last n queries, summed."""
    length, tq = x.keys.shape[1], x.queries.shape[1]
    logits = x.queries[:, -n:] @ x.keys.repeat_interleave(2, 0).transpose(1, 2) * x.scaling
    q_pos = torch.arange(length - tq, length)[-n:]
    logits = logits.masked_fill(torch.arange(length)[None, :] > q_pos[:, None], float("-inf"))
    return logits.softmax(-1).view(2, 2, n, length).mean(1).sum(1)


@pytest.mark.parametrize("n_queries", [1, 8, 50])
def test_the_last_queries_vote(n_queries):
    x = inputs()
    got = make_policy("sage", budget=16, window=4, n_queries=n_queries, kernel=1).score(x)
    torch.testing.assert_close(got, by_hand(x, min(n_queries, 12)))
    pooled = make_policy("sage", budget=16, window=4, n_queries=n_queries).score(x)
    want = F.max_pool1d(by_hand(x, min(n_queries, 12))[:, None], 7, stride=1, padding=3)[:, 0]
    torch.testing.assert_close(pooled, want)


def test_default_is_eight_queries():
    assert make_policy("sage", budget=64).n_queries == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [({"n_queries": 0}, "n_queries >= 1"), ({"pooling": "median"}, "pooling must be 'max' or 'avg'")],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        make_policy("sage", budget=64, **kwargs)
