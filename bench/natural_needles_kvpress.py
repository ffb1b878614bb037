"""kvpress on the token ids `natural_needles.py` wrote: run with the python of a venv that has kvpress
(`python3 -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install kvpress`); appends rows in
the same format (library "kvpress") to the main JSONL. Query-agnostic only: the press compresses the
context's prefill, the question tail is then run uncompressed and answered greedily (kvpress's own
pipeline does the same with text).

The zoo's converted model directories lack `architectures` in config.json, which transformers needs
to pick the model class: a patched copy is written to /tmp first.

    /tmp/kvpress-venv/bin/python bench/natural_needles_kvpress.py --ids bench/results/natural_needles_ids.jsonl \\
        --out bench/results/natural_needles.jsonl --ratios 0.5,0.25
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import torch
from kvpress import ExpectedAttentionPress, KnormPress, KVzipPress, SnapKVPress
from transformers import AutoModelForCausalLM, DynamicCache

ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def patched_dir(name: str) -> Path:
    src = Path.home() / ".cache/longserve/models" / name
    dst = Path("/tmp/kvpress-models") / name
    if not (dst / "config.json").exists():
        shutil.copytree(src, dst, dirs_exist_ok=True)
        cfg = json.loads((src / "config.json").read_text())
        cfg.setdefault("architectures", [ARCH[cfg["model_type"]]])
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def press_for(method: str, ratio: float):
    drop = 1 - ratio  # kvpress takes the fraction removed
    return {
        "snapkv": lambda: SnapKVPress(compression_ratio=drop),
        "kvzip": lambda: KVzipPress(compression_ratio=drop),
        # uniform per-layer budgets (one top-k over the heads of each layer), as longserve's kvzip+ada
        "kvzip_layerwise": lambda: KVzipPress(compression_ratio=drop, layerwise=True),
        "expected_attention": lambda: ExpectedAttentionPress(compression_ratio=drop),
        "knorm": lambda: KnormPress(compression_ratio=drop),
    }[method]()


@torch.inference_mode()
def compress(model, ctx_ids, press) -> DynamicCache:
    cache = DynamicCache()
    ctx = torch.tensor([ctx_ids])
    if press is None:
        model(input_ids=ctx, past_key_values=cache)
    else:
        with press(model):
            model(input_ids=ctx, past_key_values=cache)
    return cache


@torch.inference_mode()
def answer(model, cache, n_ctx, q_ids, max_new: int, eos: set[int], tokenizer) -> str:
    """Greedy answer on a copy of the compressed cache (so one compression serves every question);
    positions continue after the original context, as in longserve and kvpress's pipeline."""
    cache = copy.deepcopy(cache)
    pos, ids, out = n_ctx, q_ids, []
    for _ in range(max_new):
        positions = torch.arange(pos, pos + len(ids))[None]
        logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, position_ids=positions).logits
        pos += len(ids)
        token = int(logits[0, -1].argmax())
        if token in eos:
            break
        out.append(token)
        ids = [token]
    return tokenizer.decode(out, skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--methods", default="kvzip,snapkv,expected_attention,knorm")
    ap.add_argument("--samples", type=int, default=None, help="only the first N samples of the ids file")
    ap.add_argument("--max-new-tokens", type=int, default=28)
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (longserve's default is bfloat16)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    path = patched_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, args.dtype), attn_implementation="sdpa"
    ).eval()
    eos = {
        tokenizer.eos_token_id,
        *(
            [model.generation_config.eos_token_id]
            if isinstance(model.generation_config.eos_token_id, int)
            else model.generation_config.eos_token_id or []
        ),
    }
    records = [json.loads(line) for line in Path(args.ids).read_text().splitlines()][: args.samples]
    out = Path(args.out)
    done = (
        {
            (r["sample"], r["method"], r["ratio"])
            for r in map(json.loads, out.open())
            if r["library"] == "kvpress"
        }
        if out.exists()
        else set()
    )
    cells = [("full", 1.0)] + [(m, float(r)) for m in args.methods.split(",") for r in args.ratios.split(",")]
    with out.open("a") as sink:
        for rec in records:
            for method, ratio in cells:
                if (rec["sample"], method, ratio) in done:
                    continue
                rows = []
                cache = compress(
                    model, rec["context"], None if method == "full" else press_for(method, ratio)
                )
                kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
                for j, (q_ids, answers) in enumerate(zip(rec["questions"], rec["answers"], strict=True)):
                    text = answer(
                        model, cache, len(rec["context"]), q_ids, args.max_new_tokens, eos, tokenizer
                    )
                    rows.append(
                        {
                            "model": args.model,
                            "length": None,
                            "sample": rec["sample"],
                            "question": j,
                            "setting": "query_agnostic",
                            "method": method,
                            "ratio": ratio,
                            "library": "kvpress",
                            "context_tokens": len(rec["context"]),
                            "prediction": text,
                            "correct": all(a in text for a in answers),
                            "kv_bytes": kv_bytes,  # KVzip masks pruned keys in place: its bytes stay full
                            "dtype": args.dtype,
                            "load1": os.getloadavg()[0],
                            "command": "/tmp/kvpress-venv/bin/python " + shlex.join(sys.argv),
                        }
                    )
                for row in rows:
                    sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(rec["sample"], method, ratio, [r["correct"] for r in rows], flush=True)


if __name__ == "__main__":
    main()
