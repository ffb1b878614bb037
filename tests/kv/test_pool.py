"""KVPool: slots, physical sizes, and the step plans it hands the attention backends."""

import pytest
import torch

from longserve.kv.attention import DecodeBackend, PrefillBackend
from longserve.kv.cache import KVPool
from longserve.kv.policies import FullPolicy, make_policy
from tests.tiny import tiny_loaded


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama", num_hidden_layers=2)[0]


def prefilled(loaded, policy, n=40, capacity=64, n_slots=2):
    pool = KVPool(loaded.args, n_slots, capacity)
    slot = pool.allocate(policy)
    positions = torch.arange(n)
    backend = PrefillBackend(pool, slot, positions)
    with torch.inference_mode():
        loaded.model(torch.arange(1, n + 1)[None], backend.positions[None], backend)
    backend.finish()
    return pool, slot


def decode(loaded, pool, slots):
    plan = pool.plan_decode(slots)
    with torch.inference_mode():
        loaded.model(
            torch.ones(len(slots), 1, dtype=torch.long), plan.positions[:, None], DecodeBackend(pool, plan)
        )
    pool.commit(plan)
    return plan


def test_allocate_free_lowest_first_and_exhaustion(loaded):
    pool = KVPool(loaded.args, 3, 8)
    assert [pool.allocate(FullPolicy()) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate(FullPolicy())
    pool.pos[0][1].fill_(5)
    pool.free(1)
    pool.free(0)
    pool.free(0)  # freeing twice is harmless
    assert pool.n_free == 2
    assert pool.allocate(FullPolicy()) == 0  # lowest first keeps a batch contiguous
    assert pool.allocate(FullPolicy()) == 1
    assert (pool.pos[0][1] == -1).all()  # a reused slot starts empty


def test_bytes_physically_equal_capacity(loaded):
    args = loaded.args
    pool = KVPool(args, 4, 24)
    assert all(k.shape == (4, args.n_kv_heads, 24, args.head_dim) for k in pool.k)
    assert pool.nbytes() == 4 * pool.slot_nbytes() == 4 * 24 * args.kv_bytes_per_token()
    small = KVPool(args, 4, 6)  # a compressed slot is physically smaller, not masked
    assert small.slot_nbytes() * 4 == pool.slot_nbytes()


def test_append_plan_changes_nothing_until_commit(loaded):
    pool, slot = prefilled(loaded, FullPolicy())
    state = pool.slots[slot]
    assert (state.fill, state.written, state.next_pos) == (40, 40, 40)
    plan = pool.plan_decode([slot])
    assert plan.global_idx.tolist() == [40] and plan.positions.tolist() == [40]
    assert plan.global_valid.tolist() == [41] and plan.evict_rows is None
    assert state.fill == 40  # the plan is not applied yet
    pool.commit(plan)
    assert (state.fill, state.written, state.next_pos) == (41, 41, 41)
    assert pool.write_index(plan, 0).tolist() == [[40] * loaded.args.n_kv_heads]


def test_ring_plan_overwrites_the_recent_region_only(loaded):
    pool, slot = prefilled(loaded, make_policy("streaming", budget=16, window=8, n_sink=4))
    state = pool.slots[slot]
    assert (state.fill, state.limit, state.protected) == (16, 16, 4)  # streaming: all but the sinks ring
    victims = [decode(loaded, pool, [slot]).global_idx.item() for _ in range(14)]
    assert victims == [*range(4, 16), 4, 5]
    assert state.fill == 16 and state.next_pos == 54
    # positions stay the original ones: the sinks, then the newest tokens in ring order
    pos = pool.pos[0][slot, 0, :16].tolist()
    assert pos[:4] == [0, 1, 2, 3] and sorted(pos[4:]) == list(range(42, 54))


def test_evict_plan_picks_lowest_score_outside_window(loaded):
    pool, slot = prefilled(loaded, make_policy("h2o", budget=16, window=4))
    plan = pool.plan_decode([slot])
    assert plan.global_idx.tolist() == [-1] and plan.evict_rows.tolist() == [0] and plan.track_scores
    index = pool.write_index(plan, 0)[0]
    scores = pool.scores[0][slot, :, :16].clone()  # entries past the budget are never victims
    scores[pool.pos[0][slot, :, :16] > 40 - 4] = float("inf")
    assert torch.equal(index, scores.argmin(-1))
    assert (pool.pos[0][slot, torch.arange(len(index)), index] <= 36).all()  # never the recent window


def test_positions_are_original_after_eviction(loaded):
    pool, slot = prefilled(loaded, make_policy("snapkv", budget=16, window=4))
    pos = pool.pos[0][slot, :, :16]
    assert (pos[:, -4:] == torch.arange(36, 40)).all()  # the window, at its original positions
    assert ((pos >= 0) & (pos < 40)).all() and (pos.diff(dim=-1) > 0).all()
    plan = decode(loaded, pool, [slot])
    assert plan.positions.tolist() == [40]  # RoPE phase of the next token: its position, not the fill
    assert (pool.pos[0][slot, :, 16] == 40).all()  # snapkv appends after the kept prompt


def test_full_slot_plan_raises(loaded):
    pool, slot = prefilled(loaded, FullPolicy(), n=8, capacity=8)
    with pytest.raises(RuntimeError, match="is full"):
        pool.plan_decode([slot])


def test_batch_plan_valid_lengths(loaded):
    pool, a = prefilled(loaded, FullPolicy(), n=10, n_slots=3)
    b = pool.allocate(FullPolicy())
    backend = PrefillBackend(pool, b, torch.arange(5))
    with torch.inference_mode():
        loaded.model(torch.arange(1, 6)[None], backend.positions[None], backend)
    backend.finish()
    plan = pool.plan_decode([b, a])
    assert not plan.contiguous and plan.global_rows == [6, 11] and plan.positions.tolist() == [5, 10]
    valid, rows = plan.valid(pool, 0)
    assert valid.tolist() == rows == [6, 11]
