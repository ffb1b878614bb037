import torch

from longserve.spec.accept import greedy_accept, residual, stochastic_accept


def test_greedy_accept_stops_at_first_mismatch():
    logits = torch.full((4, 8), -1.0)
    for row, best in enumerate([3, 5, 1, 7]):
        logits[row, best] = 1.0
    assert greedy_accept([3, 5, 1], logits) == (3, 7)  # all accepted + bonus
    assert greedy_accept([3, 2, 1], logits) == (1, 5)  # correction at the first mismatch
    assert greedy_accept([0, 5, 1], logits) == (0, 3)
    assert greedy_accept([], logits[:1]) == (0, 3)


def test_residual_is_normalized_positive_part():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    assert torch.allclose(residual(p, q), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(residual(p, p), p)


def test_every_emitted_position_follows_the_target_distribution():
    """k=3 drafts from q over a vocabulary of 8: whatever the acceptance pattern, the token emitted at
    each position is distributed as p at that position (chi-square, p = 0.001 per position)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(4, 8, generator=gen) ** 3
    p[:, 0] = 0.0  # a token the target never emits ...
    p /= p.sum(-1, keepdim=True)
    q = torch.rand(3, 8, generator=gen) ** 3
    q[:, 0] += 0.3  # ... that the draft likes
    q[:, 7] = 0.0  # and one the draft never proposes
    q /= q.sum(-1, keepdim=True)
    trials = 8000
    all_drafts = torch.stack(
        [torch.multinomial(q[i], trials, replacement=True, generator=gen) for i in range(3)], 1
    )
    counts = torch.zeros(4, 8)
    n_accepted = torch.zeros(4)
    for drafts in all_drafts.tolist():
        n, token = stochastic_accept(drafts, q, p, gen)
        n_accepted[n] += 1
        for i, t in enumerate([*drafts[:n], token]):
            counts[i, t] += 1
    assert n_accepted.min() > 0  # every acceptance length occurred
    assert counts[:, 0].sum() == 0  # p(x) = 0 is never emitted
    for i in range(4):
        total = counts[i].sum()
        expected = p[i] * total
        mask = expected > 0
        chi2 = float(((counts[i][mask] - expected[mask]) ** 2 / expected[mask]).sum())
        assert chi2 < 22.5, (i, chi2)  # 6 degrees of freedom
