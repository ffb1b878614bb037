import pytest
import torch

from longserve.kv import quest_pages
from longserve.kv.cache import KVPool
from longserve.kv.policies import make_policy
from longserve.llm import LLM
from tests.kv.test_policies import prompt, run
from tests.tiny import tiny_loaded


@pytest.fixture(scope="module")
def llm():
    loaded, _ = tiny_loaded("llama", num_hidden_layers=2)
    return LLM(loaded=loaded)


@pytest.mark.parametrize("page_size", [4, 8, 16, 32])
def test_quest_any_page_size(llm, page_size):
    """Page tables are sized by the slot's page size (used to be a hard-coded 16)."""
    ids = prompt(3, 200)
    full = run(llm, ids, make_policy("full"), n=6)
    quest = run(llm, ids, make_policy("quest", budget=64, page_size=page_size), n=6)
    assert quest.kv_bytes_final == full.kv_bytes_final
    assert quest.kv_bytes_read < full.kv_bytes_read
    wide = run(llm, ids, make_policy("quest", budget=256, page_size=page_size), n=6)
    assert wide.output_ids == full.output_ids  # every page read: dense attention


def test_page_bounds_cover_keys():
    loaded, _ = tiny_loaded("llama", num_hidden_layers=1)
    pool = KVPool(loaded.args, 2, 20)
    slot = pool.allocate(make_policy("quest", budget=8, page_size=8))
    pool.k[0][slot, :, :20] = torch.randn(loaded.args.n_kv_heads, 20, loaded.args.head_dim)
    pool.slots[slot].fill = 19
    quest_pages.ensure(pool, slot)
    kmin, kmax = quest_pages.page_tables(pool, 0, 8)
    assert kmin.shape[2] == 3  # ceil(20 / 8) pages per slot
    keys = pool.k[0][slot]
    assert torch.equal(kmin[slot, :, 0], keys[:, :8].amin(1))
    assert torch.equal(kmax[slot, :, 2], keys[:, 16:19].amax(1))  # only the filled entries
    new = torch.full((1, loaded.args.n_kv_heads, loaded.args.head_dim), 100.0)
    quest_pages.update(pool, 0, [slot], torch.tensor([19]), new)
    assert (kmax[slot, :, 2] == 100).all()
