"""Decode tokens/s and KV bytes vs context length: `full` vs `snapstream`, batch 1 and 8 (one process,
one machine, so the ratios are fair).

Decode speed does not depend on what the prompt says, so each (context, policy) pair is prefilled once
and its slot is copied into the other slots of the batch; then `--steps` decode steps are timed (batch 1
decodes the first slot of the same pool).

    python bench/decode_throughput.py --lengths 1024,2048,4096,8192 --batches 1,8

Weights (dense fp32/bf16, int8/int4 quantized) in one process, rounds alternating between them:

    OMP_WAIT_POLICY=PASSIVE python bench/decode_throughput.py --weights fp32,bf16,int8,int4 \
        --lengths 1024 --batches 1 --policies full --rounds 3 --threads 1 --out bench/results/decode_weights
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from common import command, fmt, write_result

from longserve import LLM
from longserve.engine.sampler import SamplingParams
from longserve.kv.policies import make_policy
from longserve.model.quant import Int4Linear, Int8Linear, weight_bytes


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
    return measure_times(engine, seqs, steps)[0]


def measure_times(engine, seqs, steps: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process) over `steps` batched steps.

    On an oversubscribed machine the wall clock also counts the time the OS ran other jobs; the CPU
    time does not (it still pays for their cache and memory-bandwidth contention), so with one torch
    thread it is the better estimate of an idle core's speed. Both are reported."""
    engine.runner.decode(seqs)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        logits = engine.runner.decode(seqs)
        for seq, tok in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            seq.output_ids.append(tok)
    n = len(seqs) * steps
    return n / (time.perf_counter() - start), n / max(1e-9, time.process_time() - cpu)


def rss(field: str = "VmRSS") -> int | None:
    """This process's resident (or, with VmHWM, peak resident) bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux), so the next peak is that of what follows."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def load(model: str, weights: str) -> tuple[LLM, dict]:
    """The LLM with ``weights`` (fp32/bf16 dense, int8/int4 quantized, auto) and its memory facts."""
    before = rss()
    reset_peak()
    llm = LLM(model, weights=weights, progress=False)
    peak, after = rss("VmHWM"), rss()
    facts = {
        "weights": weights,
        "dtype": str(llm.dtype).removeprefix("torch."),
        "weight_bytes": weight_bytes(llm.loaded.model),
        "read_bytes_per_token": linear_bytes(llm.loaded.model),
        "load_peak_rss_delta": peak - before if peak and before else None,
        "load_rss_delta": after - before if after and before else None,
    }
    return llm, facts


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads from weights: every linear layer (LM head included; a tied head reads
    the embedding table), once per step whatever the batch; the embedding lookup reads one row."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | Int8Linear | Int4Linear):
            total += sum(
                t.nbytes for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            )
    return total


def bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: best of `repeats` sums over a `gib` GiB tensor (first touch excluded)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--policies", default="full,snapstream@512,snapstream@1024")
    ap.add_argument(
        "--weights",
        default="fp32",
        help="comma list of fp32, bf16, int8, int4, auto (each loaded once; rounds alternate between them)",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="timed rounds per row, alternating configs (median)"
    )
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench/results/decode_throughput")
    ap.add_argument("--append", action="store_true", help="add rows to an existing --out JSON (same machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [load(args.model, w) for w in args.weights.split(",")]
    bw = bandwidth()
    print(json.dumps({"bandwidth_GBps": bw / 1e9, "configs": [f for _, f in configs]}), flush=True)
    llm = configs[0][0]
    filler = llm.tokenizer.encode(
        "The grass is green. The sky is blue. The sun is yellow. " * 2000, add_special_tokens=False
    )
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if args.append else {"rows": [], "meta": {}}
    rows = previous["rows"]
    commands = previous["meta"].get("commands", [])
    for length in map(int, args.lengths.split(",")):
        ids = filler[: length - 2 * args.steps * args.rounds - 8]  # warm-up + timed steps fit the window
        for spec in args.policies.split(","):
            batches = sorted(map(int, args.batches.split(",")))
            prepared = [
                (facts, *prepare(llm, ids, spec, batches[-1], args.steps * 2 * args.rounds))
                for llm, facts in configs
            ]
            for batch in batches:  # smaller batches decode the first slots of the same pool
                speeds: list[list[tuple[float, float]]] = [[] for _ in prepared]
                for _ in range(args.rounds):  # A/B/C/D, A/B/C/D, ...: the same minutes for every config
                    for i, (_, engine, seqs, _) in enumerate(prepared):
                        speeds[i].append(measure_times(engine, seqs[:batch], args.steps))
                for (facts, engine, _, prefill_s), runs in zip(prepared, speeds, strict=True):
                    tok_s = statistics.median(r[0] for r in runs)
                    cpu_tok_s = statistics.median(r[1] for r in runs)
                    kv_read = engine.pool.slot_nbytes() * batch
                    per_step = facts["read_bytes_per_token"] + kv_read
                    row = {
                        "context": len(ids),
                        "policy": spec,
                        "batch": batch,
                        "steps": args.steps,
                        **facts,
                        "decode_tok_s": tok_s,
                        "decode_tok_per_cpu_s": cpu_tok_s,
                        "rounds_tok_s": [r[0] for r in runs],
                        "rounds_tok_per_cpu_s": [r[1] for r in runs],
                        "load_average": os.getloadavg()[0],
                        "step_ms": 1000 * batch / tok_s,
                        "prefill_s": prefill_s,
                        "kv_bytes_per_seq": engine.pool.slot_nbytes(),
                        "kv_bytes_total": kv_read,
                        "bandwidth_Bps": bw,
                        "bandwidth_bound_fraction": (per_step * tok_s / batch) / bw,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del prepared
    for row in rows:  # ratio to full at the same context, batch and weights, measured in this run
        row.setdefault("weights", "fp32")  # rows from before --weights existed were fp32
        base = next(
            r
            for r in rows
            if r["policy"] == "full"
            and r["context"] == row["context"]
            and r["batch"] == row["batch"]
            and r.get("weights", "fp32") == row["weights"]
        )
        row["speedup_vs_full"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["kv_vs_full"] = row["kv_bytes_per_seq"] / base["kv_bytes_per_seq"]
    commands.append(command())
    meta = {
        "commands": commands,
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    lines = [
        f"# Decode throughput: {args.model}",
        "",
        "Commands (rows of every command, same machine, "
        f"{meta['torch_threads']} torch threads, OMP_WAIT_POLICY={meta['omp_wait_policy'] or 'unset'}, "
        f"{meta['date']}):",
        "",
        *[f"    {c}" for c in commands],
        "",
        "Weights are loaded once each; with --rounds > 1 the timed rounds alternate between them and the",
        "median is shown. Bound fraction: (weight + KV bytes read per step) x steps/s / measured read",
        "bandwidth (one `sum` over 1 GiB with the same threads, in the same run). tok per CPU-s: tokens",
        "per second of this process's CPU time, the estimate for an idle core when other jobs share the",
        "machine (load avg: the 1-minute load average at the row; 2 cores here).",
        "",
        "| context | policy | batch | weights | decode tok/s (aggregate) | x full | KV MiB/seq | KV vs full "
        "| weight MiB | load peak RSS MiB | bound fraction | tok per CPU-s | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mib = {
            k: fmt(r[k] / 2**20 if r.get(k) else None, ".0f") for k in ("weight_bytes", "load_peak_rss_delta")
        }
        lines.append(
            f"| {r['context']} | {r['policy']} | {r['batch']} | {r['weights']} | {r['decode_tok_s']:.1f} | "
            f"{r['speedup_vs_full']:.2f} | {r['kv_bytes_per_seq'] / 2**20:.1f} | {r['kv_vs_full']:.3f} | "
            f"{mib['weight_bytes']} | {mib['load_peak_rss_delta']} | "
            f"{fmt(r.get('bandwidth_bound_fraction'), '.2f')} | {fmt(r.get('decode_tok_per_cpu_s'), '.1f')} | "
            f"{fmt(r.get('load_average'), '.1f')} |"
        )
    write_result(out, {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
