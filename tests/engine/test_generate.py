import pytest
import torch

from longserve.llm import LLM
from tests.tiny import FAMILIES, tiny_loaded


def hf_greedy(ref, ids, n):
    ids_t = torch.tensor([ids])
    out = ref.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def prompt(seed, n):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_policy_greedy_equals_transformers_generate(family):
    loaded, ref = tiny_loaded(family)
    llm = LLM(loaded=loaded, max_batch_size=4)
    prompts = [prompt(s, n) for s, n in ((1, 30), (2, 45), (3, 12))]
    expected = [hf_greedy(ref, p, 20) for p in prompts]
    # a batch of ragged prompts decoded together must give each prompt's own greedy tokens
    engine = llm.engine(3, 80)
    from longserve.engine.sampler import SamplingParams
    from longserve.kv.policies import FullPolicy

    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    seqs = [engine.add_request(p, params, FullPolicy()) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert [s.output_ids for s in seqs] == expected


def test_bfloat16_halves_kv_bytes_and_tracks_float32():
    """bf16 weights and KV (2.5-3.5x faster matmuls on CPUs with AVX512-BF16): half the KV bytes, and
    the first greedy tokens agree with float32 under full and compressed policies."""
    import copy

    from longserve.engine.sampler import SamplingParams
    from longserve.kv.policies import make_policy

    loaded, _ = tiny_loaded("qwen2", num_hidden_layers=2)
    half = copy.copy(loaded)
    half.model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    fp32, bf16 = LLM(loaded=loaded), LLM(loaded=half, dtype="bfloat16")
    ids = prompt(7, 150)
    for policy in (
        make_policy("full"),
        make_policy("snapstream", budget=48, window=8),
        make_policy("snapkv", budget=48, window=8, head_adaptive=True),
    ):
        outs = []
        for llm in (fp32, bf16):
            engine = llm.engine(1, policy.capacity(150, 4))
            seq = engine.add_request(ids, SamplingParams(max_new_tokens=4, ignore_eos=True), policy)
            while engine.has_unfinished():
                engine.step()
            outs.append(seq)
        assert outs[1].kv_bytes_allocated * 2 == outs[0].kv_bytes_allocated
        assert outs[1].output_ids[:2] == outs[0].output_ids[:2], policy.name
