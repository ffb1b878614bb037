"""Loading must not hold a second copy of the weights: peak RSS measured on a tiny model written to disk.

The old path (random-init model + `safetensors.load_file` state dict + fused q/k/v copies) peaked at 2.15x
the fp32 weights and 3.8x when casting an fp32 file to bf16, measured with this same probe.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from longserve.loader import build_model, empty_model, load_state
from longserve.model.checkpoint import CHUNK_BYTES
from tests.tiny import hf_config

#: ~46 MiB of fp32 weights: large enough that allocator noise (a few MiB) does not decide the ratio.
BIG = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
)

PROBE = """
import json, pathlib, sys
import torch
from longserve.loader import empty_model, load_state
from tests.tiny import hf_config

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

cfg = hf_config("llama", **json.loads(sys.argv[2]))
dtype = getattr(torch, sys.argv[3])
empty_model(cfg, dtype)  # imports and lazy inits happen before the baseline
if sys.argv[4] != "dense":  # and the kernels' code pages (they count as RSS once touched)
    from longserve.model.quant import Int4Linear, Int8Linear
    lin = torch.nn.Linear(256, 32)
    for q in (Int8Linear(lin, dtype), Int4Linear(lin, dtype)):
        q(torch.zeros(1, 256, dtype=dtype))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
base = status("VmRSS")
model = empty_model(cfg, dtype)
if sys.argv[4] == "dense":
    load_state(model, pathlib.Path(sys.argv[1]))
    model.eval().fuse()
else:
    from longserve.model.quant import quantize_head, quantize_layer
    hook = lambda i: quantize_layer(model.model.layers[i], sys.argv[4], dtype)
    load_state(model, pathlib.Path(sys.argv[1]), on_layer=hook)
    quantize_head(model, sys.argv[4])
tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if "inv_freq" not in n]
weights = sum({t.data_ptr(): t.nbytes for t in tensors}.values())
print(json.dumps({"peak": status("VmHWM") - base, "weights": weights}))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("big")
    state = {k: v.contiguous() for k, v in build_model(hf_config("llama", **BIG)).state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    return d


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset VmHWM")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_of_a_load_is_the_weights_plus_one_chunk(big_checkpoint, dtype):
    """Bound: the weights (1x) + one staging chunk for the fp32 -> bf16 cast (CHUNK_BYTES, 4 MiB) + 8 MiB
    for Python objects and allocator slack; that is 1.10x (fp32) / 1.18x (bf16) at this size, where a
    second copy of the state dict alone would be 2x."""
    got = _probe(big_checkpoint, dtype, "dense")
    expected_weights = sum(p.numel() for p in build_model(hf_config("llama", **BIG)).parameters())
    assert got["weights"] == expected_weights * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    assert got["peak"] <= got["weights"] + CHUNK_BYTES + (8 << 20), got
    assert got["peak"] / got["weights"] < 1.5, got


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset VmHWM")
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_quantized_load_never_holds_the_dense_model(big_checkpoint, weights):
    """Layers are quantized as they are read: the peak is the quantized model + one dense layer and the
    dense head being quantized + 24 MiB of fixed cost (the 4 MiB fp32/int32 chunk temporaries and what the
    allocator keeps of them: measured 21-23 MiB here, and +33 MiB over the int4 weights of SmolLM2, so it
    does not grow with the model). Quantizing after a dense load would add the 23 MiB of bf16 weights."""
    got = _probe(big_checkpoint, "bfloat16", weights)
    one_layer = 2 * (256 * (128 + 64 + 64) + 128 * 256 + 3 * 256 * 1024)  # bf16 q/k/v/o + gate/up/down
    head = 2 * 8192 * 256
    assert got["peak"] <= got["weights"] + one_layer + head + (24 << 20), got
    assert got["weights"] < 0.7 * 23 * 2**20  # quantized: the embedding table stays bf16


def _probe(checkpoint: Path, dtype: str, weights: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(checkpoint), json.dumps(BIG), dtype, weights],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": f"{root / 'src'}:{root}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fused_weights_are_the_loaded_weights_not_a_copy(big_checkpoint):
    model = empty_model(hf_config("llama", **BIG), torch.bfloat16)
    load_state(model, big_checkpoint)
    model.eval().fuse()
    attn, mlp = model.model.layers[3].self_attn, model.model.layers[3].mlp
    assert attn.qkv.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    assert mlp.gate_up.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    x = torch.randn(1, 3, BIG["hidden_size"], dtype=torch.bfloat16)
    with torch.no_grad():
        assert attn.qkv.usable() and mlp.gate_up.usable()
        fused = torch.nn.functional.linear(x, attn.qkv.weight)
        parts = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    assert torch.equal(fused, parts)
    assert not any(p.is_meta for p in model.parameters())
    assert all(b.dtype == torch.float32 and not b.is_meta for b in model.buffers())  # RoPE stays fp32


def test_fp32_file_loads_into_bf16_by_rounding(big_checkpoint):
    """The cast on load equals casting the fp32 tensors (old fp32 caches keep working without a re-pull)."""
    ref = build_model(hf_config("llama", **BIG))
    load_state(ref, big_checkpoint)
    model = empty_model(hf_config("llama", **BIG), torch.bfloat16)
    load_state(model, big_checkpoint)
    for (name, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name
