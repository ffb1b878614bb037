"""GPU smoke run: a random-weight ~1B Llama-like model, 8 sequences x 8k tokens, `full` vs `snapstream`.

Self-contained (no download: the weights are random, the prompts random ids), so it runs on a bare GPU
machine. It checks that the engine keeps every step on the device and reports, per policy, the prefill
time, the batched decode tokens/s and the KV bytes (allocated by the pool and held by the sequences).

    python bench/gpu_smoke.py                      # cuda, bf16, 8 x 8192 tokens
    python bench/gpu_smoke.py --small --device cpu  # tiny config and short prompts, to check the script
"""

from __future__ import annotations

import argparse
import time

import torch
from common import command, fmt, machine, write_result

from longserve.engine.engine import LLMEngine
from longserve.engine.sampler import SamplingParams
from longserve.kv.policies import make_policy
from longserve.loader import LoadedModel, build_model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class RandomTokenizer:
    """Just enough of a tokenizer for the engine: no ids are ever decoded to text here."""

    eos_token_id = None
    bos_token = None
    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def model_config(small: bool):
    from transformers import LlamaConfig

    if small:
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        return LlamaConfig(**sizes, num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    return LlamaConfig(  # TinyLlama-1.1B's shape
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=16384,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_policy(loaded: LoadedModel, spec: str, n_seqs: int, length: int, steps: int, dtype, device) -> dict:
    name, _, budget = spec.partition("@")
    policy = make_policy(name, budget=int(budget) if budget else None)
    engine = LLMEngine(
        loaded, n_seqs, policy.capacity(length, steps + 1), prefill_chunk=length, dtype=dtype, device=device
    )
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    seqs = []
    for _ in range(n_seqs):
        ids = torch.randint(0, loaded.args.vocab_size, (length,), generator=gen).tolist()
        seqs.append(engine.add_request(ids, params, policy))
    engine.scheduler.admit()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for seq in seqs:
        logits = engine.runner.prefill(seq, length)
        seq.output_ids.append(int(logits.argmax()))
    sync(device)
    prefill_s = time.perf_counter() - start
    engine.runner.decode(seqs)  # warm-up step
    sync(device)
    start = time.perf_counter()
    for _ in range(steps - 1):
        logits = engine.runner.decode(seqs)
        for seq, tok in zip(seqs, logits.argmax(-1).tolist(), strict=True):  # the one sync per step
            seq.output_ids.append(tok)
    sync(device)
    decode_s = time.perf_counter() - start
    return {
        "policy": spec,
        "sequences": n_seqs,
        "prompt_tokens": length,
        "decode_steps": steps - 1,
        "prefill_s": prefill_s,
        "prefill_tok_s": n_seqs * length / prefill_s,
        "decode_tok_s": n_seqs * (steps - 1) / decode_s,
        "kv_bytes_allocated": engine.pool.nbytes(),
        "kv_bytes_held": sum(engine.pool.held_nbytes(s.slot) for s in seqs),
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny config and short prompts (CPU check)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--length", type=int, help="prompt tokens per sequence (default 8192, --small 256)")
    ap.add_argument("--steps", type=int, help="decode steps (default 64, --small 8)")
    ap.add_argument(
        "--policies", default="full,snapstream@1024", help="`name` or `name@budget`, comma-separated"
    )
    ap.add_argument("--out", help="default bench/results/gpu_smoke (--small: gpu_smoke_small)")
    args = ap.parse_args()
    length = args.length or (256 if args.small else 8192)
    steps = args.steps or (8 if args.small else 64)
    policies = (
        args.policies
        if not args.small or args.policies != ap.get_default("policies")
        else "full,snapstream@64"
    )
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    cfg = model_config(args.small)
    with torch.device(device):  # initialise the random weights where they will run
        model = build_model(cfg, dtype).eval().fuse()
    n_params = sum(p.numel() for p in model.parameters())
    loaded = LoadedModel("random-llama", None, model, RandomTokenizer(), model.args, ())
    rows = [
        run_policy(loaded, spec, args.sequences, length, steps, dtype, device) for spec in policies.split(",")
    ]
    result = {
        "command": command(),
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": args.dtype,
        "params": n_params,
        "rows": rows,
    }
    lines = [
        f"# GPU smoke: random Llama-like model, {n_params / 1e9:.2f}B params, {args.dtype}, {result['device']}",
        "",
        f"    {result['command']}",
        "",
        result["machine"],
        "",
        "| policy | seqs x tokens | prefill s | prefill tok/s | decode tok/s | KV MiB allocated | KV MiB held "
        "| peak device GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = r["peak_device_bytes"] / 2**30 if r["peak_device_bytes"] is not None else None
        lines.append(
            f"| {r['policy']} | {r['sequences']} x {r['prompt_tokens']} | {r['prefill_s']:.2f} | "
            f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['kv_bytes_allocated'] / 2**20:.1f} | "
            f"{r['kv_bytes_held'] / 2**20:.1f} | {fmt(peak, '.2f')} |"
        )
    write_result(
        args.out or f"bench/results/gpu_smoke{'_small' if args.small else ''}", result, "\n".join(lines)
    )


if __name__ == "__main__":
    main()
