"""The resident-object protocol (`close()`, `weight_bytes`) and `ModelTiers` under several threads."""

from __future__ import annotations

import random
import threading

import pytest

from longserve.coe import Expert, ModelTiers, WeightBudgetError

MIB = 2**20


class Resident:
    """A resident object that is not an LLM: it states its own weight bytes and must be closed."""

    def __init__(self, name: str, size: int, live: dict):
        self.name, self.weight_bytes, self.live, self.closed = name, size, live, False
        live[id(self)] = size

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True
        del self.live[id(self)]


class Loader:
    """Counts loads; checks on every load that the objects not yet closed plus the new one fit the
    budget (parking must close before loading, not after). ``gate`` makes a load wait until set."""

    def __init__(self, sizes: dict[str, int], budget: int):
        self.sizes, self.budget, self.live, self.loads = sizes, budget, {}, []
        self.gate, self.started = threading.Event(), threading.Event()
        self.gate.set()
        self.over_budget = False

    def __call__(self, expert: Expert) -> Resident:
        self.loads.append(expert.name)
        self.started.set()
        self.gate.wait()
        size = self.sizes[expert.model]
        self.over_budget |= sum(self.live.values()) + size > self.budget
        return Resident(expert.name, size, self.live)


def test_park_closes_the_object_and_its_weight_bytes_are_used():
    loader = Loader({"a": 3 * MIB, "b": 2 * MIB}, 4 * MIB)
    tiers = ModelTiers([Expert("a", "a"), Expert("b", "b")], 4 * MIB, loader)
    a = tiers.get("a")
    assert tiers.sizes["a"] == 3 * MIB and not a.closed
    b = tiers.get("b")  # 3 + 2 > 4: a is parked, closed before b is loaded
    assert a.closed and not b.closed and tiers.tier("a") == 1 and not loader.over_budget
    tiers.park("b")
    assert b.closed and not tiers.resident
    tiers.park("b")  # not resident: nothing to do
    assert tiers.stats()["parked"] == ["a", "b"]


def test_an_object_too_large_for_the_budget_is_closed_and_refused():
    loader = Loader({"a": 5 * MIB}, 4 * MIB)
    tiers = ModelTiers([Expert("a", "a")], 4 * MIB, loader)
    with pytest.raises(WeightBudgetError, match="more than the whole budget"):
        tiers.get("a")
    assert not loader.live and not tiers.resident and not tiers.loading


def test_a_second_get_waits_for_the_load_in_flight_and_resident_experts_keep_serving():
    loader = Loader({"a": MIB, "c": MIB}, 4 * MIB)
    tiers = ModelTiers([Expert("a", "a"), Expert("c", "c")], 4 * MIB, loader)
    c = tiers.get("c")
    loader.gate.clear()
    loader.started.clear()
    got: list = []
    first = threading.Thread(target=lambda: got.append(tiers.get("a")))
    first.start()
    assert loader.started.wait(10)  # a's load is in progress (and blocked)
    second = threading.Thread(target=lambda: got.append(tiers.get("a")))
    second.start()
    second.join(0.2)
    assert second.is_alive() and not got  # waits for the load in flight
    assert tiers.get("c") is c and tiers.stats()["loading"] == ["a"]  # not held up by the switch
    loader.gate.set()
    first.join(10)
    second.join(10)
    assert len(got) == 2 and got[0] is got[1] and loader.loads == ["c", "a"]


def test_many_threads_never_exceed_the_budget_nor_load_twice_at_once():
    sizes = {"a": 3 * MIB, "b": 2 * MIB, "c": 2 * MIB, "d": MIB}
    budget = 5 * MIB
    loader = Loader(sizes, budget)
    experts = [Expert(n, n, pinned=n == "d") for n in sizes]
    tiers = ModelTiers(experts, budget, loader)
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(40):
                obj = tiers.get(rng.choice("abcd"))
                assert obj.name in "abcd"
                assert tiers.resident_bytes <= budget
        except BaseException as exc:  # surfaced below: a thread's assert does not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not loader.over_budget
    assert sum(loader.live.values()) == tiers.resident_bytes <= budget  # parked ones were all closed
    assert "d" in tiers.resident  # pinned
    assert len(loader.loads) == len(tiers.switches)  # every load became one switch, none duplicated
