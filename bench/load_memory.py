"""Peak RSS of loading a model's weights: longserve's loader vs the state-dict path it replaced.

Each measurement runs in a fresh subprocess: imports, config and one meta-device model first, then VmHWM
is reset (`/proc/self/clear_refs`) and the weights are loaded; the figure is the peak over the RSS
before the load, against the bytes of the loaded parameters.

- `stream`: what `longserve.loader.load` does: the model on the meta device, every safetensors tensor
  read straight into its parameter (cast through a 4 MiB chunk), q/k/v and gate/up into their fused
  buffers.
- `int8` / `int4`: `load(..., weights=...)`: as `stream`, each decoder layer quantized as soon as it
  is read, then the LM head (weights = the quantized model, bf16 embedding included).
- `state-dict`: the previous path: random-init model, `safetensors.load_file` state dict,
  `load_state_dict`, then fused copies of q/k/v and gate/up.

    python bench/load_memory.py --models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import command, machine, write_result

PROBE = r"""
import json, sys, time
import torch
from transformers import AutoConfig
from longserve import loader, zoo

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

name, dtype, mode = sys.argv[1:4]
path = zoo.resolve(name, progress=False)
cfg = AutoConfig.from_pretrained(path)
loader.empty_model(cfg, torch.float32)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base, start = status("VmRSS"), time.perf_counter()
if mode == "stream":
    model = loader.empty_model(cfg, loader.DTYPES[dtype])
    loader.load_state(model, path)
elif mode in ("int8", "int4"):
    from longserve.model.quant import quantize_head, quantize_layer, weight_bytes
    model = loader.empty_model(cfg, loader.DTYPES[dtype])
    hook = lambda i: quantize_layer(model.model.layers[i], mode, loader.DTYPES[dtype])
    loader.load_state(model, path, on_layer=hook)
    quantize_head(model, mode)
else:
    from safetensors.torch import load_file
    model = loader.build_model(cfg, loader.DTYPES[dtype])
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    model.load_state_dict({loader.model_key(k): v for k, v in state.items()}, strict=False)
    del state
if mode not in ("int8", "int4"):
    model.eval().fuse()
tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if "inv_freq" not in n]
weights = sum({t.data_ptr(): t.nbytes for t in tensors}.values())
print(json.dumps({"peak": status("VmHWM") - base, "after": status("VmRSS") - base, "weights": weights,
                  "seconds": time.perf_counter() - start}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--modes", default="stream,state-dict,int8,int4")
    ap.add_argument("--out", default="bench/results/load_memory")
    args = ap.parse_args()
    rows = []
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for mode in args.modes.split(","):
                if mode in ("int8", "int4") and dtype != "bfloat16":
                    continue  # quantized weights run with bf16 activations
                proc = subprocess.run(
                    [sys.executable, "-c", PROBE, model, dtype, mode], capture_output=True, text=True
                )
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr)
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                row = {
                    "model": model,
                    "dtype": dtype,
                    "mode": mode,
                    **got,
                    "ratio": got["peak"] / got["weights"],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = [
        "# Peak RSS of a weight load",
        "",
        f"Command: `{command()}` ({machine()}, {time.strftime('%Y-%m-%d %H:%M')}; other jobs were running)",
        "",
        "Peak and final RSS over the process before the load (imports, config, tokenizer excluded).",
        "",
        "| model | dtype | loader | weights MiB | peak RSS MiB | peak / weights | RSS after MiB | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['weights'] / 2**20:.0f} | {r['peak'] / 2**20:.0f} "
            f"| {r['ratio']:.2f} | {r['after'] / 2**20:.0f} | {r['seconds']:.1f} |"
        )
    write_result(args.out, {"rows": rows, "command": command()}, "\n".join(lines))


if __name__ == "__main__":
    main()
