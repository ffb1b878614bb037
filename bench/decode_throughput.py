"""Decode tokens/s and KV bytes vs context length: `full` vs `snapstream`, batch 1 and 8 (one process,
one machine, so the ratios are fair).

Decode speed does not depend on what the prompt says, so each (context, policy) pair is prefilled once
and its slot is copied into the other slots of the batch; then `--steps` decode steps are timed (batch 1
decodes the first slot of the same pool).

    python bench/decode_throughput.py --lengths 1024,2048,4096,8192 --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import command, write_result

from longserve import LLM
from longserve.engine.sampler import SamplingParams
from longserve.kv.policies import make_policy


def clone_slot(pool, src: int, dst: int) -> None:
    for layer in range(pool.args.n_layers):
        pool.k[layer][dst] = pool.k[layer][src]
        pool.v[layer][dst] = pool.v[layer][src]
        pool.pos[layer][dst] = pool.pos[layer][src]
    s, d = pool.slots[src], pool.slots[dst]
    for field in ("fill", "protected", "ring_next", "written", "next_pos", "limit", "peak_fill"):
        setattr(d, field, getattr(s, field))


def prepare(llm: LLM, ids: list[int], spec: str, batch: int, steps: int):
    """An engine whose `batch` slots all hold the prefilled (and compressed) prompt."""
    name, _, budget = spec.partition("@")
    policy = make_policy(name, budget=int(budget) if budget else None)
    engine = llm.engine(batch, policy.capacity(len(ids), steps + 2))
    params = SamplingParams(max_new_tokens=steps + 2, ignore_eos=True)
    seqs = [engine.add_request(ids, params, policy) for _ in range(batch)]
    engine.scheduler.admit()
    first = seqs[0]
    start = time.perf_counter()
    logits = engine.runner.prefill(first, len(ids))
    prefill_s = time.perf_counter() - start
    token = int(logits.argmax())
    for seq in seqs:
        if seq is not first:
            clone_slot(engine.pool, first.slot, seq.slot)
            seq.prefilled = seq.prompt_len
        seq.output_ids.append(token)
    return engine, sorted(seqs, key=lambda s: s.slot), prefill_s


def measure(engine, seqs, steps: int) -> float:
    """Aggregate decode tokens/s of `steps` batched steps over `seqs` (after one warm-up step)."""
    engine.runner.decode(seqs)
    start = time.perf_counter()
    for _ in range(steps):
        logits = engine.runner.decode(seqs)
        for seq, tok in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            seq.output_ids.append(tok)
    return len(seqs) * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--policies", default="full,snapstream@512,snapstream@1024")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default="bench/results/decode_throughput")
    ap.add_argument("--append", action="store_true", help="add rows to an existing --out JSON (same machine)")
    args = ap.parse_args()
    llm = LLM(args.model, progress=False)
    filler = llm.tokenizer.encode(
        "The grass is green. The sky is blue. The sun is yellow. " * 2000, add_special_tokens=False
    )
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if args.append else {"rows": [], "meta": {}}
    rows = previous["rows"]
    commands = previous["meta"].get("commands", [])
    for length in map(int, args.lengths.split(",")):
        ids = filler[: length - 2 * args.steps - 8]  # room for warm-up + timed steps inside the window
        for spec in args.policies.split(","):
            batches = sorted(map(int, args.batches.split(",")))
            engine, seqs, prefill_s = prepare(llm, ids, spec, batches[-1], args.steps * 2)
            for batch in batches:  # smaller batches decode the first slots of the same pool
                tok_s = measure(engine, seqs[:batch], args.steps)
                row = {
                    "context": len(ids),
                    "policy": spec,
                    "batch": batch,
                    "steps": args.steps,
                    "decode_tok_s": tok_s,
                    "step_ms": 1000 * batch / tok_s,
                    "prefill_s": prefill_s,
                    "kv_bytes_per_seq": engine.pool.slot_nbytes(),
                    "kv_bytes_total": engine.pool.slot_nbytes() * batch,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            del engine, seqs
    for row in rows:  # ratio to full at the same context and batch, measured in this run
        base = next(
            r
            for r in rows
            if r["policy"] == "full" and r["context"] == row["context"] and r["batch"] == row["batch"]
        )
        row["speedup_vs_full"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["kv_vs_full"] = row["kv_bytes_per_seq"] / base["kv_bytes_per_seq"]
    commands.append(command())
    meta = {
        "commands": commands,
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    lines = [
        f"# Decode throughput: {args.model}",
        "",
        "Commands (rows of every command, same machine, "
        f"{meta['torch_threads']} torch threads, {meta['date']}):",
        "",
        *[f"    {c}" for c in commands],
        "",
        "| context | policy | batch | decode tok/s (aggregate) | x full | KV MiB/seq | KV vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['policy']} | {r['batch']} | {r['decode_tok_s']:.1f} | "
            f"{r['speedup_vs_full']:.2f} | {r['kv_bytes_per_seq'] / 2**20:.1f} | {r['kv_vs_full']:.3f} |"
        )
    write_result(out, {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
