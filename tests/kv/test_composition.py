"""Policy composition: AdaKV is a wrapper, decode behaviour is a strategy object, both plug in
without touching the pool or the attention backends."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from longserve.errors import InvalidParameterError
from longserve.kv.cache import SlotState
from longserve.kv.policies import (
    APPEND,
    EVICT,
    REGISTRY,
    RING,
    AdaKVPolicy,
    DecodeStrategy,
    Policy,
    PolicyWrapper,
    ScoreInputs,
    make_policy,
)
from longserve.kv.policies.snapkv import SnapKVPolicy
from longserve.kv.policies.strategy import BY_SCORE
from longserve.llm import LLM
from tests.kv.test_policies import prompt, run
from tests.tiny import tiny_loaded


@pytest.fixture(scope="module")
def llm():
    loaded, _ = tiny_loaded("llama", num_hidden_layers=2)
    return LLM(loaded=loaded)


def test_adakv_is_a_wrapper_with_the_inner_budget():
    inner = SnapKVPolicy(budget=48, window=8, kernel=5)
    ada = AdaKVPolicy(inner, head_floor=0.3)
    assert ada == make_policy("snapkv", budget=48, window=8, kernel=5, head_adaptive=True, head_floor=0.3)
    assert ada != make_policy("snapkv", budget=48, window=8, kernel=5, head_adaptive=True)
    assert (ada.budget, ada.window, ada.name, ada.decode) == (48, 8, "snapkv", APPEND)
    assert ada.head_adaptive and not inner.head_adaptive
    assert ada.capacity(200, 4) == inner.capacity(200, 4) == 52
    assert ada.describe() == {**inner.describe(), "head_adaptive": True, "head_floor": 0.3}
    assert make_policy(**ada.describe()) == ada  # what a stored context records rebuilds it


def test_replace_keeps_or_drops_the_wrapper():
    ada = make_policy("snapstream", budget=64, window=8, head_adaptive=True)
    smaller = ada.replace(budget=32)
    assert isinstance(smaller, AdaKVPolicy) and smaller.budget == 32 and smaller.decode == RING
    assert type(ada.replace(head_adaptive=False)) is REGISTRY["snapstream"]
    assert isinstance(make_policy("snapkv", budget=32).replace(head_adaptive=True), AdaKVPolicy)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: AdaKVPolicy(make_policy("h2o", budget=64)), "not supported by policy 'h2o'"),
        (lambda: AdaKVPolicy(make_policy("snapkv", budget=64), head_floor=2), "head_floor"),
        (lambda: AdaKVPolicy(AdaKVPolicy(make_policy("snapkv", budget=64))), "already head-adaptive"),
        (lambda: make_policy("snapkv", budget=64, head_floor=0.5), "bad parameter"),
    ],
)
def test_bad_wrapping_is_a_one_line_error(build, message):
    with pytest.raises(InvalidParameterError, match=message):
        build()


def test_strategies_pick_the_entry_of_a_full_slot():
    state = SlotState(make_policy("snapstream", budget=8, window=4), fill=8, protected=4, limit=8)
    assert [RING.full_slot_entry(state) for _ in range(5)] == [4, 5, 6, 7, 4]
    assert APPEND.full_slot_entry(state) is None
    assert EVICT.full_slot_entry(state) == BY_SCORE
    assert RING.full_slot_entry(SlotState(state.policy, fill=4, protected=4, limit=4)) is None


@dataclass(frozen=True)
class OverwriteNewest(DecodeStrategy):
    """A made-up behaviour: a full slot keeps overwriting its last entry."""

    name: ClassVar[str] = "overwrite-newest"

    def full_slot_entry(self, state: SlotState) -> int | None:
        return state.limit - 1


@dataclass
class NewestPolicy(Policy):
    name: ClassVar[str] = "newest"
    decode: ClassVar[DecodeStrategy] = OverwriteNewest()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.positions.float()[None]


def test_a_new_decode_strategy_is_one_class(llm):
    """The pool and attention run a strategy they have never heard of: the slot stays its budget and
    every decode token lands in the last entry."""
    ids = prompt(3, 100)
    policy = NewestPolicy(budget=24, window=8)
    seq = run(llm, ids, policy, n=6)
    assert seq.kv_bytes_allocated == 24 * llm.loaded.args.kv_bytes_per_token()
    assert len(seq.output_ids) == 6


class DoubleSinks(PolicyWrapper):
    """A made-up wrapper: the wrapped policy's scores, with the first `n` tokens forced in."""

    options: ClassVar[tuple[str, ...]] = ("n",)

    def __init__(self, policy: Policy, n: int = 4):
        super().__init__(policy)
        self.n = n

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        scores = self.policy.score(inputs).float().clone()
        scores[..., : self.n] = float("inf")
        return scores


def test_a_new_wrapper_changes_only_what_it_overrides(llm):
    ids = prompt(4, 120)
    inner = make_policy("snapkv", budget=32, window=8)
    wrapped = DoubleSinks(inner, n=6)
    engine = llm.engine(1, wrapped.capacity(120, 2))
    from longserve.engine.sampler import SamplingParams

    seq = engine.add_request(ids, SamplingParams(max_new_tokens=2, ignore_eos=True), wrapped)
    engine.step()
    _, _, pos = engine.pool.layer_entries(0, seq.slot)
    assert (pos[:, :6] == torch.arange(6)).all()  # every head kept the forced tokens
    assert wrapped.replace(budget=40) == DoubleSinks(inner.replace(budget=40), n=6)
    assert wrapped.describe() == {**inner.describe(), "n": 6}
