import pytest
import torch

from longserve.kv.attention import PrefillBackend
from longserve.kv.cache import KVPool
from longserve.kv.policies import FullPolicy
from tests.tiny import FAMILIES, tiny_loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    loaded, ref = tiny_loaded(family)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    pool = KVPool(loaded.args, 1, 64)
    slot = pool.allocate(FullPolicy())
    backend = PrefillBackend(pool, slot, torch.arange(40))
    with torch.no_grad():
        ours = loaded.model(ids, torch.arange(40)[None], backend, last_only=False)
        theirs = ref(ids).logits
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
