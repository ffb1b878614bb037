import pytest
import torch
import torch.nn.functional as F

from longserve.engine.sampler import SamplingParams
from longserve.errors import InvalidParameterError
from longserve.kv.policies import REGISTRY, make_policy
from longserve.llm import LLM
from tests.tiny import tiny_loaded

#: Every registered policy that evicts at prefill: a new policy is tested by registering it.
COMPRESSING = [name for name, cls in REGISTRY.items() if cls.compresses]
SPARSE = [name for name, cls in REGISTRY.items() if cls.sparse_decode]


def prompt(seed, n):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(llm, ids, policy, n=12, chunk=None):
    engine = llm.engine(1, policy.capacity(len(ids), n))
    if chunk:
        engine.scheduler.prefill_chunk = chunk
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=n, ignore_eos=True), policy)
    while engine.has_unfinished():
        engine.step()
    return seq


@pytest.fixture(scope="module")
def llm():
    loaded, _ = tiny_loaded("llama", num_hidden_layers=2)
    return LLM(loaded=loaded)


@pytest.mark.parametrize("name", [*COMPRESSING, *SPARSE])
def test_budget_at_least_prompt_equals_full(llm, name):
    ids = prompt(0, 40)
    full = run(llm, ids, make_policy("full"))
    other = run(llm, ids, make_policy(name, budget=64, **({"window": 8} if name not in SPARSE else {})))
    assert other.output_ids == full.output_ids


@pytest.mark.parametrize("name", COMPRESSING)
def test_cache_bytes_equal_budget(llm, name):
    ids = prompt(1, 200)
    policy = make_policy(name, budget=48, window=8)
    seq = run(llm, ids, policy, n=10)
    args = llm.loaded.args
    per_token = args.kv_bytes_per_token()
    fixed = policy.decode.fixed_size
    expected_tokens = 48 if fixed else 48 + 10
    assert seq.kv_bytes_allocated == expected_tokens * per_token  # the slot tensors are that small
    assert seq.kv_bytes_peak <= expected_tokens * per_token
    assert seq.stats()["kv_tokens_final"] == (48 if fixed else 48 + 9)


def test_snapkv_keeps_window_and_selects_per_head(llm):
    ids = prompt(2, 120)
    policy = make_policy("snapkv", budget=40, window=16)
    engine = llm.engine(1, policy.capacity(120, 2))
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=2, ignore_eos=True), policy)
    engine.step()  # prefill + first token
    pos = engine.pool.pos[0][seq.slot, :, :40]
    assert (pos[:, -16:] == torch.arange(104, 120)).all()  # the observation window is always kept
    assert (pos.diff(dim=-1) > 0).all()  # original order
    assert not torch.equal(pos[0], pos[1])  # each KV head chose its own tokens


class MaskedReference:
    """Full cache, but each head only sees the positions the compressed slot kept for it."""

    def __init__(self, keep_by_layer, n_prompt):
        self.keep, self.n_prompt = keep_by_layer, n_prompt

    def attend(self, layer, q, k, v):
        t = k.shape[2]
        mask = torch.zeros(k.shape[1], t, t, dtype=torch.bool)
        causal = torch.ones(t, t).tril().bool()
        for h, kept in enumerate(self.keep[layer]):
            visible = torch.zeros(t, dtype=torch.bool)
            visible[kept] = True
            visible[self.n_prompt :] = True
            mask[h] = causal & visible
        mask[:, : self.n_prompt] = causal[: self.n_prompt]  # prompt rows as in prefill
        group = q.shape[1] // k.shape[1]
        mask = mask.repeat_interleave(group, 0)[None]
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=0.25
        )

    def logits(self, model, ids: list[int]) -> torch.Tensor:
        """[T, V] logits of every position of `ids` under this masking."""
        with torch.no_grad():
            return model(torch.tensor([ids]), torch.arange(len(ids))[None], self, last_only=False)[0]


@pytest.mark.parametrize("name", ["snapkv", "knorm", "streaming"])
def test_positions_after_eviction(llm, name):
    """The next tokens are computed at their original positions: the compressed run equals a full
    run in which each head is masked to exactly the tokens the policy kept."""
    ids = prompt(3, 90)
    policy = make_policy(name, budget=30, window=6)
    engine = llm.engine(1, policy.capacity(90, 4))
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=4, ignore_eos=True), policy)
    engine.step()
    keep = [engine.pool.pos[layer][seq.slot, :, :30].clone() for layer in range(llm.loaded.args.n_layers)]
    while engine.has_unfinished():
        engine.step()
    ref = MaskedReference(keep, 90).logits(llm.loaded.model, ids + seq.output_ids[:-1])[89:]
    assert ref.argmax(-1).tolist() == seq.output_ids


def test_chunked_prefill_equals_single_shot(llm):
    ids = prompt(4, 150)
    for name in ("full", "snapkv", "snapstream"):
        policy = make_policy(name, budget=None if name == "full" else 48, window=8)
        assert run(llm, ids, policy, chunk=40).output_ids == run(llm, ids, policy).output_ids, name


def test_finished_sequence_frees_its_slot_at_once(llm):
    ids = prompt(5, 100)
    stream = make_policy("streaming", budget=20)
    engine = llm.engine(1, stream.capacity(100, 1))
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=1, ignore_eos=True), stream)
    assert engine.pool.n_free == 1
    engine.step()  # prefill + the only token: the sequence finishes
    assert seq.is_finished and seq.slot is None
    assert engine.pool.n_free == 1 and all(s is None for s in engine.pool.slots)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "nope"}, "unknown kv policy"),
        ({"name": "snapkv", "budget": 0}, "budget must be > 0"),
        ({"name": "snapkv", "ratio": 1.5}, "ratio must be in (0, 1]"),
        ({"name": "snapkv", "budget": 16, "window": 32}, "exceed the kv budget"),
        ({"name": "snapkv"}, "exactly one of"),
    ],
)
def test_bad_policy_parameters(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_policy(kwargs.pop("name"), **kwargs)


def test_registry_names_match_classes_and_round_trip():
    assert {"full", "streaming", "snapkv", "sage", "snapstream", "h2o", "quest", "knorm", "random"} <= set(
        REGISTRY
    )
    for name, cls in REGISTRY.items():
        assert cls.name == name
        policy = make_policy(name, budget=64) if cls.compresses or cls.sparse_decode else make_policy(name)
        assert make_policy(**policy.describe()) == policy


def test_quest_reads_fewer_bytes_but_holds_all(llm):
    ids = prompt(6, 200)
    full = run(llm, ids, make_policy("full"), n=8)
    quest = run(llm, ids, make_policy("quest", budget=48), n=8)
    assert quest.kv_bytes_final == full.kv_bytes_final  # Quest keeps every token
    assert quest.kv_bytes_read < 0.5 * full.kv_bytes_read  # but reads 3 pages of 16 per head per step
    # with a budget covering every page, Quest reads everything and equals full attention
    assert run(llm, ids, make_policy("quest", budget=256), n=8).output_ids == full.output_ids
