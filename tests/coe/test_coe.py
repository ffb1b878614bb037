"""Composition of experts: exact weight budget, park and re-attach, routing."""

from __future__ import annotations

import pytest
import torch

from longserve.coe import CoE, Expert, ModelTiers, Router, WeightBudgetError, load_experts
from longserve.coe.tiers import weight_bytes
from longserve.errors import InvalidParameterError, ModelNotFoundError
from longserve.llm import LLM
from tests.tiny import tiny_loaded

SEEDS = {"a": 1, "b": 2, "c": 3}


class CountingLoader:
    """Builds a tiny random LLM per expert (its seed decides its weights) and counts loads."""

    def __init__(self):
        self.loads: list[str] = []

    def __call__(self, expert: Expert) -> LLM:
        self.loads.append(expert.name)
        return LLM(loaded=tiny_loaded("llama", seed=SEEDS[expert.model])[0])


@pytest.fixture(scope="module")
def one_size() -> int:
    return weight_bytes(LLM(loaded=tiny_loaded("llama", seed=1)[0]))


def greedy(llm: LLM) -> list[int]:
    return llm.generate(list(range(10, 40)), max_new_tokens=6, ignore_eos=True)[0].token_ids


def test_each_expert_answers_with_its_own_weights_and_comes_back_the_same(one_size):
    loader = CountingLoader()
    tiers = ModelTiers([Expert("a", "a"), Expert("b", "b")], 2 * one_size, loader)
    first_a, first_b = greedy(tiers.get("a")), greedy(tiers.get("b"))
    assert first_a != first_b  # two different models
    tiers.park("a")
    assert tiers.tier("a") == 1 and tiers.tier("b") == 0
    assert greedy(tiers.get("a")) == first_a and loader.loads == ["a", "b", "a"]
    assert [s.from_tier for s in tiers.switches] == [2, 2, 1]


def test_the_budget_is_never_exceeded(one_size):
    loader = CountingLoader()
    tiers = ModelTiers([Expert("a", "a"), Expert("b", "b"), Expert("c", "c")], 2 * one_size, loader)
    for name in "abcabca":
        tiers.get(name)
        assert tiers.resident_bytes <= tiers.max_weight_bytes and len(tiers.resident) <= 2
    assert list(tiers.resident) == ["c", "a"]  # least recently used parked first
    assert tiers.switches[2].parked == ["a"]  # room made before loading c: never three in memory


def test_pinned_experts_stay_and_a_too_large_expert_is_refused(one_size):
    tiers = ModelTiers([Expert("a", "a", pinned=True), Expert("b", "b")], one_size, CountingLoader())
    tiers.get("a")
    with pytest.raises(WeightBudgetError, match="pinned experts"):
        tiers.get("b")
    small = ModelTiers([Expert("a", "a")], one_size // 2, CountingLoader())
    with pytest.raises(WeightBudgetError, match="more than the whole budget"):
        small.get("a")
    assert not small.resident
    with pytest.raises(ModelNotFoundError, match="unknown model 'zzz'"):
        tiers.get("zzz")


def embed_keywords(texts: list[str]) -> torch.Tensor:
    words = ["code", "python", "story", "poem", "weather"]
    vectors = torch.tensor([[t.lower().count(w) + 0.01 for w in words] for t in texts])
    return torch.nn.functional.normalize(vectors, dim=-1)


def test_router_rules_then_nearest_then_resident_within_margin():
    experts = [
        Expert("coder", "a", description="python code", rules=[r"```"]),
        Expert("writer", "b", description="story poem"),
    ]
    router = Router(experts, embed_keywords, margin=0.05)
    assert router.route("```print(1)``` a story").expert == "coder"
    assert router.route("```print(1)```").reason == "rule"
    route = router.route("write a poem and a story")
    assert (route.expert, route.reason) == ("writer", "nearest")
    tie = "python story"  # equally close to both
    assert router.route(tie, resident=["writer"]).expert == "writer"
    assert router.route(tie, resident=["coder"]).expert == "coder"


def test_coe_generate_routes_and_reports_the_switch(one_size):
    loader = CountingLoader()
    coe = CoE([Expert("a", "a"), Expert("b", "b")], 2 * one_size, load=loader)
    out = coe.generate(list(range(10, 40)), model="b", max_new_tokens=4, ignore_eos=True)
    assert out.stats["expert"] == "b" and out.stats["switch_s"] > 0
    again = coe.generate(list(range(10, 40)), model="b", max_new_tokens=4, ignore_eos=True)
    assert again.stats["switch_s"] == 0 and again.token_ids == out.token_ids
    assert coe.tiers.experts["a"].pinned  # the router's model stays resident


def test_experts_file(tmp_path):
    path = tmp_path / "experts.toml"
    path.write_text(
        '[code]\nmodel = "qwen2.5-coder-0.5b-instruct"\ndescription = "code"\nrules = ["def "]\npinned = true\n'
        '[chat]\nmodel = "smollm2-135m-instruct"\nexamples = ["hello"]\n'
    )
    experts = load_experts(path)
    assert [(e.name, e.pinned, e.profile) for e in experts] == [
        ("code", True, ["code"]),
        ("chat", False, ["hello"]),
    ]
    assert experts[0].matches("def f(): pass") and not experts[1].matches("def")
    path.write_text('[x]\nmodel = "m"\ncolour = "red"\n')
    with pytest.raises(InvalidParameterError, match="unknown keys"):
        load_experts(path)
    path.write_text("[x\n")
    with pytest.raises(InvalidParameterError, match="not valid TOML"):
        load_experts(path)
    with pytest.raises(InvalidParameterError, match="bad rule regex"):
        Expert("x", "m", rules=["("])


def embed_with_common_direction(texts: list[str]) -> torch.Tensor:
    """Keyword counts on top of a large shared component, as LLM hidden states have: without
    centering every text is nearly parallel to every other."""
    return torch.stack([torch.tensor([50.0, 50.0, 50.0]) + v for v in embed_keywords(texts)[:, :3]])


def test_examples_vote_per_expert_and_centering_removes_the_common_direction():
    coder = Expert("coder", "a", description="weather", examples=["python code", "code code", "python"])
    writer = Expert("writer", "b", description="story", examples=["story poem", "poem"])
    router = Router([coder, writer], embed_with_common_direction, margin=0.02)
    # the description says nothing about code: the expert's 3 nearest examples carry the vote
    assert router.route("python code python").expert == "coder"
    flat = Router([coder, writer], embed_with_common_direction, margin=0.02, center=False)
    scores = flat.scores("python code python")
    assert max(scores.values()) - min(scores.values()) < 0.02  # uncentered: a near-tie everywhere...
    assert flat.route("python code python", resident=["writer"]).expert == "writer"  # ...so residency decides
    assert router.route("python code python", resident=["writer"]).expert == "coder"  # centered: not a tie


def test_hidden_state_embedder_fetches_the_model_per_batch_and_caches_texts():
    from longserve.coe.router import HiddenStateEmbedder

    llm = LLM(loaded=tiny_loaded("llama", seed=1)[0])
    calls = []

    def fetch():
        calls.append(1)
        return llm

    embed = HiddenStateEmbedder(fetch)
    first = embed(["hello there", "some code"])
    assert first.shape == (2, llm.loaded.args.hidden_size) and len(calls) == 1
    assert torch.equal(embed(["some code"])[0], first[1]) and len(calls) == 1  # cached: no model needed
    shallow = HiddenStateEmbedder(lambda: llm, layer_fraction=0.34)(["hello there"])[0]
    assert not torch.allclose(shallow, first[0])  # the depth is honoured
