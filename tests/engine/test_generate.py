import pytest
import torch

from longserve.llm import LLM
from tests.tiny import FAMILIES, tiny_loaded


def hf_greedy(ref, ids, n):
    ids_t = torch.tensor([ids])
    out = ref.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def prompt(seed, n):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_policy_greedy_equals_transformers_generate(family):
    loaded, ref = tiny_loaded(family)
    llm = LLM(loaded=loaded, max_batch_size=4)
    prompts = [prompt(s, n) for s, n in ((1, 30), (2, 45), (3, 12))]
    expected = [hf_greedy(ref, p, 20) for p in prompts]
    # a batch of ragged prompts decoded together must give each prompt's own greedy tokens
    engine = llm._engine(3, 80)
    from longserve.engine.sampler import SamplingParams
    from longserve.kv.policies import FullPolicy

    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    seqs = [engine.add_request(p, params, FullPolicy()) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert [s.output_ids for s in seqs] == expected
