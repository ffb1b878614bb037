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


def test_fused_weights_follow_training_and_are_dropped_when_stale():
    loaded, _ = tiny_loaded("qwen2")  # qkv bias too
    model = loaded.model
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))

    def logits():
        pool = KVPool(loaded.args, 1, 16)
        backend = PrefillBackend(pool, pool.allocate(FullPolicy()), torch.arange(12))
        return model(ids, torch.arange(12)[None], backend, last_only=False)

    with torch.no_grad():
        fused = logits()
        assert model.model.layers[0].self_attn.qkv.usable()
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # an optimizer step, in place
        model.model.layers[0].mlp.up_proj.weight.mul_(0.5)
        assert not model.model.layers[0].self_attn.qkv.usable()
        changed = logits()
        model.fuse()
        refused = logits()
    assert not torch.allclose(fused, changed)
    torch.testing.assert_close(changed, refused)
    with torch.enable_grad():
        assert not model.model.layers[0].mlp.gate_up.usable()  # training uses the originals


def test_to_moves_rope_tables_keeps_them_fp32_and_refuses():
    import copy

    loaded, _ = tiny_loaded("gemma3")  # two RoPE kinds
    model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    freqs = dict(model.named_buffers())
    assert {n for n in freqs if "inv_freq" in n} == {f"inv_freq_{k}" for k in model.rope_kinds}
    assert all(f.dtype == torch.float32 for f in freqs.values())  # bf16 would shift far positions
    assert not any("inv_freq" in k for k in model.state_dict())  # not persistent: checkpoints unchanged
    qkv = model.model.layers[0].self_attn.qkv
    with torch.no_grad():
        assert qkv.weight.dtype == torch.bfloat16 and qkv.usable()  # the fused copy followed the weights
