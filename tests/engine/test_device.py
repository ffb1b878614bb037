"""Every tensor a step creates lives on the model's device.

The model runs on the `meta` device: a tensor made on the CPU by mistake meets a meta tensor in some op
(caught by `SameDevice`), and a per-layer host sync (`int(t)`, `.tolist()`) on a meta tensor raises."""

import copy
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from longserve.engine.engine import LLMEngine
from longserve.engine.sampler import SamplingParams
from longserve.kv.policies import make_policy
from tests.tiny import tiny_loaded


class SameDevice(TorchDispatchMode):
    """Fails any op whose tensor arguments (0-dim CPU scalars aside) are on more than one device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        assert len(devices) <= 1, f"{func} mixes devices {devices}"
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def meta_loaded():
    loaded, _ = tiny_loaded("gemma3")  # global and sliding-window layers
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to("meta"))


POLICIES = [
    ("full", {}),
    ("snapstream", {"budget": 32, "window": 8}),
    ("h2o", {"budget": 32, "window": 8}),
    ("quest", {"budget": 32, "page_size": 8}),
    ("snapkv", {"budget": 32, "window": 8, "head_adaptive": True}),
]


@pytest.mark.parametrize(("name", "kwargs"), POLICIES)
def test_engine_step_tensors_stay_on_the_model_device(meta_loaded, name, kwargs):
    model = meta_loaded.model
    assert all(b.device.type == "meta" for b in model.buffers())  # rope tables moved with the weights
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "inv_freq" in n)
    policy = make_policy(name, **kwargs)
    ids = list(range(1, 61))
    engine = LLMEngine(meta_loaded, 2, policy.capacity(len(ids), 8))
    assert engine.pool.device.type == "meta"
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=8, ignore_eos=True), policy)
    engine.scheduler.admit()
    with SameDevice():
        assert engine.runner.prefill(seq, 40) is None  # chunked: a staging pool for compressing policies
        logits = engine.runner.prefill(seq, 20)
        assert logits.device.type == "meta"
        for step in range(6):
            seq.output_ids.append(step + 1)
            assert engine.runner.decode([seq]).device.type == "meta"
    assert engine.pool.slots[seq.slot].written == 66
