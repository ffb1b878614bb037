"""load_state must refuse weights that do not match the model instead of silently serving a broken one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from longserve.errors import CorruptModelError
from longserve.loader import build_model, empty_model, load_state
from tests.tiny import hf_config


def _write(tmp_path: Path, extra: dict[str, torch.Tensor] | None = None, drop: str | None = None) -> Path:
    """A tiny llama's own weights on disk, plus ``extra`` tensors and minus ``drop``."""
    state = {k: v.contiguous() for k, v in build_model(hf_config("llama")).state_dict().items()}
    state.update(extra or {})
    if drop:
        del state[drop]
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_matching_weights_load(tmp_path):
    path = _write(tmp_path)
    model = build_model(hf_config("llama"))
    with torch.no_grad():
        model.model.norm.weight.fill_(7.0)
    load_state(model, path)
    assert not torch.equal(model.model.norm.weight, torch.full_like(model.model.norm.weight, 7.0))


def test_unexpected_keys_are_an_error_that_names_them(tmp_path):
    path = _write(
        tmp_path, {"model.layers.0.mlp.router.weight": torch.zeros(4, 64), "score.bias": torch.zeros(2)}
    )
    with pytest.raises(CorruptModelError, match="2 tensors") as err:
        load_state(build_model(hf_config("llama")), path)
    assert "model.layers.0.mlp.router.weight" in str(err.value) and "model.score.bias" in str(err.value)
    assert "another architecture" in str(err.value)


def test_many_unexpected_keys_stay_one_short_line(tmp_path):
    path = _write(tmp_path, {f"model.extra.{i}": torch.zeros(1) for i in range(40)})
    with pytest.raises(CorruptModelError, match="40 tensors") as err:
        load_state(build_model(hf_config("llama")), path)
    assert "35 more" in str(err.value) and "\n" not in str(err.value)


def test_multimodal_towers_and_rope_buffers_are_ignored(tmp_path):
    """A multimodal checkpoint serves its text decoder; HF's saved inv_freq is rebuilt from the config."""
    extra = {
        "vision_tower.vision_model.embeddings.patch_embedding.weight": torch.zeros(2, 2),  # older HF layout
        "vision_tower.embeddings.patch_embedding.weight": torch.zeros(2, 2),  # Gemma3ForConditionalGeneration
        "multi_modal_projector.mm_input_projection_weight": torch.zeros(2, 2),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8),
    }
    load_state(build_model(hf_config("llama")), _write(tmp_path, extra))


def test_missing_keys_are_an_error(tmp_path):
    path = _write(tmp_path, drop="model.layers.1.mlp.down_proj.weight")
    with pytest.raises(CorruptModelError, match="lack 1 tensors.*model.layers.1.mlp.down_proj.weight"):
        load_state(build_model(hf_config("llama")), path)


def test_wrong_shape_is_a_corrupt_model_error(tmp_path):
    path = _write(tmp_path, {"model.norm.weight": torch.zeros(32)})
    with pytest.raises(CorruptModelError, match="model.norm.weight"):
        load_state(build_model(hf_config("llama")), path)


@pytest.mark.parametrize("keep", [4, 100, -10])
def test_truncated_file_is_a_corrupt_model_error_naming_it(tmp_path, keep):
    """Cut inside the length prefix, inside the JSON header, and inside the last tensor's data."""
    path = _write(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(CorruptModelError, match=r"cannot read model\.safetensors \(.*\); re-pull") as err:
        load_state(empty_model(hf_config("llama")), path)
    assert "\n" not in str(err.value)


def test_empty_model_loads_to_the_same_outputs_as_a_built_one(tmp_path):
    """Meta-device construction + assignment serves the same model as random init + copy (tied head too)."""
    from longserve.kv.attention import PrefillBackend
    from longserve.kv.cache import KVPool
    from longserve.kv.policies import FullPolicy

    cfg = hf_config("llama", tie_word_embeddings=True)
    state = {k: v.contiguous() for k, v in build_model(cfg).state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    built, empty = build_model(cfg), empty_model(cfg)
    load_state(built, tmp_path)
    load_state(empty, tmp_path)
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))

    def logits(model):
        model.eval().fuse()
        pool = KVPool(model.args, 1, 16)
        backend = PrefillBackend(pool, pool.allocate(FullPolicy()), torch.arange(9))
        with torch.no_grad():
            return model(ids, torch.arange(9)[None], backend, last_only=False)

    assert torch.equal(logits(built), logits(empty))
