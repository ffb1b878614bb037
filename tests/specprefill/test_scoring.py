"""Importance scores against a naive reference (HF eager attentions), chunk selection, windows, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from longserve.errors import InvalidParameterError
from longserve.specprefill.scoring import (
    SpecPrefillConfig,
    chunk_scores,
    chunks_for,
    scored_layers,
    select_tokens,
    token_importance,
)
from tests.tiny import tiny_loaded


def naive_pool(row: list[float], kernel: int) -> list[float]:
    n, half = len(row), kernel // 2
    return [sum(row[j] for j in range(t - half, t - half + kernel) if 0 <= j < n) / kernel for t in range(n)]


def reference_scores(
    hf, ids: list[int], lookahead: list[int], layers: list[int], kernel: int
) -> torch.Tensor:
    """Full attention matrices from the HF twin (eager, output_attentions); rows of the last prompt token and
    of each look-ahead token, renormalised over the prompt keys; pooled, max over layers x heads, mean."""
    n = len(ids)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids + lookahead]), output_attentions=True)
    for j, token in enumerate(lookahead):  # the look-ahead is the draft's greedy continuation
        assert int(out.logits[0, n - 1 + j].argmax()) == token
    rows = range(n - 1, n + len(lookahead))
    per_row = []
    for r in rows:
        best = [0.0] * n
        for layer in layers:
            att = out.attentions[layer][0]  # [H, S, S]
            for h in range(att.shape[0]):
                probs = att[h, r, :n]
                probs = (probs / probs.sum()).tolist()
                best = [max(a, b) for a, b in zip(best, naive_pool(probs, kernel), strict=True)]
        per_row.append(best)
    return torch.tensor(per_row).mean(0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_importance_matches_naive_reference(family):
    loaded, hf = tiny_loaded(family, seed=3)
    ids = [(i * 37 + 11) % 250 for i in range(45)]
    cfg = SpecPrefillConfig(lookahead=4, pool_kernel=5)
    imp = token_importance(loaded.model, ids, cfg)
    assert imp.scores.shape == (45,) and len(imp.lookahead_ids) == 4
    layers = scored_layers(loaded.model)
    if family == "gemma3":
        assert layers == [3]  # sliding-window layers only see the tail: not scored
    ref = reference_scores(hf, ids, imp.lookahead_ids, layers, kernel=5)
    torch.testing.assert_close(imp.scores, ref, atol=2e-6, rtol=1e-4)


def test_even_kernel_and_no_lookahead():
    loaded, hf = tiny_loaded("qwen2", seed=5)
    ids = [(i * 13 + 5) % 250 for i in range(30)]
    imp = token_importance(loaded.model, ids, SpecPrefillConfig(lookahead=0, pool_kernel=4))
    ref = reference_scores(hf, ids, [], list(range(3)), kernel=4)
    torch.testing.assert_close(imp.scores, ref, atol=2e-6, rtol=1e-4)


def test_chunked_draft_prefill_is_exact():
    loaded, _ = tiny_loaded("llama", seed=1)
    ids = [(i * 7 + 3) % 250 for i in range(70)]
    whole = token_importance(loaded.model, ids, SpecPrefillConfig(lookahead=3))
    chunked = token_importance(loaded.model, ids, SpecPrefillConfig(lookahead=3, prefill_chunk=16))
    assert whole.lookahead_ids == chunked.lookahead_ids
    torch.testing.assert_close(whole.scores, chunked.scores, atol=1e-6, rtol=1e-5)


def test_windowed_scoring_beyond_the_draft_window():
    loaded, _ = tiny_loaded("llama", seed=2)
    ids = [(i * 11 + 1) % 250 for i in range(300)]
    cfg = SpecPrefillConfig(chunk=16, lookahead=2, keep_tail=16, window=100)
    imp = token_importance(loaded.model, ids, cfg)
    assert imp.windows > 1 and imp.scores.shape == (300,)
    assert torch.isfinite(imp.scores).all() and (imp.scores > 0).all()
    # a prompt that fits the window is scored in one pass, exactly as without a window
    short = ids[:90]
    one = token_importance(loaded.model, short, cfg)
    torch.testing.assert_close(
        one.scores,
        token_importance(loaded.model, short, SpecPrefillConfig(chunk=16, lookahead=2, keep_tail=16)).scores,
    )
    assert one.windows == 1


def test_selection_keeps_order_best_chunks_and_forced_tail():
    scores = torch.zeros(100)
    scores[40:50] = 5.0  # chunk 4 (size 10) is best
    scores[10:20] = 3.0  # chunk 1 second
    forced = torch.zeros(100, dtype=torch.bool)
    forced[-15:] = True  # chunk 9 fully forced + half of chunk 8
    mask = select_tokens(scores, forced, chunk=10, n_select=3)
    kept_chunks = sorted({i // 10 for i in mask.nonzero().flatten().tolist() if not forced[i]})
    assert kept_chunks == [1, 4]  # the fully forced chunk took one of the three slots
    assert mask[-15:].all()
    assert mask.sum() == 10 + 10 + 15
    # per-chunk means, shorter last chunk included
    means = chunk_scores(torch.arange(25, dtype=torch.float), 10)
    assert means.tolist() == [4.5, 14.5, 22.0]
    assert chunks_for(0.1, 30) == 3 and chunks_for(0.25, 10) == 3 and chunks_for(1.0, 7) == 7


@pytest.mark.parametrize("keep", [0, 0.0, -0.1, 1.01, float("nan"), True, "0.5", None])
def test_keep_outside_unit_interval_is_refused(keep):
    with pytest.raises(InvalidParameterError):
        SpecPrefillConfig(keep=keep)


@pytest.mark.parametrize(
    "field,value",
    [
        ("chunk", 0),
        ("lookahead", -1),
        ("pool_kernel", 0),
        ("keep_tail", -2),
        ("tolerance", 0),
        ("window", 10),
    ],
)
def test_other_bad_parameters(field, value):
    with pytest.raises(InvalidParameterError):
        SpecPrefillConfig(**{field: value})


def test_empty_prompt_is_refused():
    loaded, _ = tiny_loaded("llama")
    with pytest.raises(InvalidParameterError):
        token_importance(loaded.model, [], SpecPrefillConfig())
    assert math.isclose(SpecPrefillConfig(keep=1).keep, 1.0)
