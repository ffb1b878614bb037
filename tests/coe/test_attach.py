"""Tier 1 by mapping: a parked expert comes back from its flat file with no read, no cast, no copy,
answers exactly as before, and its memory leaves the process when it is parked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longserve.coe import Expert, ModelTiers
from longserve.coe.attach import AttachLoader, read_flat, write_flat
from longserve.coe.tiers import weight_bytes
from longserve.errors import CorruptModelError
from longserve.llm import LLM
from tests.specprefill.helpers import fast_tokenizer
from tests.tiny import hf_model

PROMPT = "the quick brown fox jumps over"


def model_dir(tmp_path: Path, seed: int, **overrides) -> Path:
    """A tiny random HF model with a real tokenizer, saved as a checkpoint directory (fp32)."""
    path = tmp_path / f"tiny-{seed}"
    hf_model("llama", seed, vocab_size=320, **overrides).save_pretrained(path, safe_serialization=True)
    fast_tokenizer("a").save_pretrained(path)
    return path


def greedy(llm: LLM) -> list[int]:
    return llm.generate(PROMPT, max_new_tokens=8, ignore_eos=True)[0].token_ids


def mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if line.rstrip().endswith(".flat")}


def inside(t: torch.Tensor, files_storage: torch.Tensor) -> bool:
    start = files_storage.untyped_storage().data_ptr()
    return start <= t.data_ptr() < start + files_storage.untyped_storage().nbytes()


@pytest.mark.parametrize("weights", ["auto", "int8", "int4"])
def test_reattach_maps_the_flat_file_and_answers_the_same(tmp_path, weights):
    path = model_dir(tmp_path, seed=1)
    reference = LLM(str(path), dtype="bfloat16", weights=weights, progress=False)
    expected, size = greedy(reference), weight_bytes(reference)
    del reference
    loader = AttachLoader(tmp_path / "tier1")
    tiers = ModelTiers([Expert("a", str(path), weights=weights)], 10 * size, loader)
    first = tiers.get("a")
    assert greedy(first) == expected and weight_bytes(first) == size  # the budget counts the same bytes
    flat = first.loaded.weights_file
    assert str(flat) in mapped_files()
    del first
    tiers.park("a")
    assert str(flat) not in mapped_files()  # parked: the mapping (and its RSS) left the process
    again = tiers.get("a")
    assert tiers.switches[-1].from_tier == 1 and greedy(again) == expected
    embed = again.loaded.model.model.embed_tokens.weight
    layer = again.loaded.model.model.layers[0]
    if weights == "auto":  # the fused block is the mapped bytes themselves, and its parts view it
        assert inside(layer.self_attn.qkv.weight, embed)
        assert layer.self_attn.q_proj.weight.data_ptr() == layer.self_attn.qkv.weight.data_ptr()
    else:
        proj = layer.self_attn.q_proj
        assert inside(proj.qweight if weights == "int8" else proj.packed, embed)  # the packs are mapped
    assert len(list(loader.directory.glob("*.flat"))) == 1  # written once, at the first load


def test_tied_embeddings_stay_one_tensor(tmp_path):
    path = model_dir(tmp_path, seed=2, tie_word_embeddings=True)
    reference = LLM(str(path), dtype="bfloat16", progress=False)
    expected, size = greedy(reference), weight_bytes(reference)
    llm = AttachLoader(tmp_path / "t")(Expert("a", str(path)))
    assert llm.loaded.model.lm_head.weight is llm.loaded.model.model.embed_tokens.weight
    assert weight_bytes(llm) == size and greedy(llm) == expected


def test_flat_file_round_trip_keeps_shared_storage_and_refuses_damage(tmp_path):
    block = torch.arange(24, dtype=torch.float32)
    state = {"a": block[:8].view(2, 4), "b": block[8:], "c": torch.ones(3, dtype=torch.int8)}
    state["t"] = state["a"].t()
    file = tmp_path / "w.flat"
    write_flat(state, file)
    back = read_flat(file)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert back["b"].data_ptr() - back["a"].data_ptr() == 8 * 4  # one block again, not two copies
    assert back["t"].data_ptr() == back["a"].data_ptr() and back["t"].stride() == (1, 4)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 4096])
    with pytest.raises(CorruptModelError, match="truncated"):
        read_flat(file)
    file.write_bytes(b"not a flat file at all")
    with pytest.raises(CorruptModelError, match="not a longserve flat weights file"):
        read_flat(file)


class Served:
    """A server-style resident object: wraps an LLM as ``.llm``, must be closed, states its bytes."""

    def __init__(self, llm: LLM):
        self.llm, self.closed = llm, False
        self.weight_bytes = weight_bytes(llm)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_parked_llm_is_freed_by_its_last_reference_without_a_full_collection(tmp_path, wrapped):
    """A full gc costs most of a second in a process with real tokenizers: park must not need one."""
    import gc

    path = model_dir(tmp_path, seed=3)
    loader = AttachLoader(tmp_path / "t")
    tiers = ModelTiers([Expert("a", str(path))], 2**30, (lambda e: Served(loader(e))) if wrapped else loader)
    obj = tiers.get("a")
    llm = obj.llm if wrapped else obj
    greedy(llm)  # served once: the engine's objects must not keep it alive either
    flat = str(llm.loaded.weights_file)
    del llm
    collections: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    gc.disable()
    gc.callbacks.append(record)
    try:
        del obj
        tiers.park("a")
    finally:
        gc.callbacks.remove(record)
        gc.enable()
    assert flat not in mapped_files() and 2 not in collections


def test_llm_options_reach_every_llm_and_reserved_ones_are_refused(tmp_path):
    from longserve.errors import InvalidParameterError

    path = model_dir(tmp_path, seed=4)
    loader = AttachLoader(tmp_path / "t", max_batch_size=3, prefill_chunk=16)
    first, again = loader(Expert("a", str(path))), loader(Expert("a", str(path)))
    assert (first.max_batch_size, again.max_batch_size, again.prefill_chunk) == (3, 3, 16)
    assert greedy(first) == greedy(again)
    with pytest.raises(InvalidParameterError, match="sets dtype itself"):
        AttachLoader(dtype="float32")
