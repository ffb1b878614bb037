"""Decode tok/s, eager vs the compiled step (`StepCompiler`), under a fixed-size policy.

Each dtype's model is prefilled once at `--context` tokens under `--policy` and the slot is copied to
the batch's other slots (`decode_throughput.prepare`); then, per batch size, the first compiled step
is timed on its own (trace + inductor compile + run: the warm-up, reported apart), and `--rounds`
rounds alternate `--steps` eager steps and `--steps` compiled steps over the same slots, so both see
the same machine load. tok/s is the best round's.

    python bench/compiled_decode.py --out bench/results/compiled_decode
"""

from __future__ import annotations

import argparse
import time

import torch
from common import command, machine, write_result
from decode_throughput import measure, prepare

from longserve import LLM
from longserve.engine.compiled_decode import StepCompiler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--policy", default="snapstream@512")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: inductor's default)")
    ap.add_argument("--weights", default="auto", help="LLM(weights=): auto, int8, int4")
    ap.add_argument("--freezing", action="store_true", help="inductor freezing (weights as constants)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results/compiled_decode")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for dtype in a.dtypes.split(","):
        llm = LLM(a.model, dtype=dtype, weights=a.weights, progress=False)
        filler = llm.tokenizer.encode(
            "The grass is green. The sky is blue. " * (a.context // 4), add_special_tokens=False
        )
        ids = filler[: a.context]
        batches = sorted(map(int, a.batches.split(",")))
        engine, seqs, _ = prepare(llm, ids, a.policy, batches[-1], a.steps)
        compiler = StepCompiler(
            llm.loaded.model, mode=a.mode, options={"freezing": True} if a.freezing else None
        )
        for batch in batches:
            sub = seqs[:batch]
            engine.runner.compiler = compiler
            start = time.perf_counter()
            engine.runner.decode(sub)
            warmup_s = time.perf_counter() - start
            compiled_steps = len(compiler.steps)
            eager, compiled = [], []
            for _ in range(a.rounds):
                engine.runner.compiler = None
                eager.append(measure(engine, sub, a.steps))
                engine.runner.compiler = compiler
                compiled.append(measure(engine, sub, a.steps))
            assert len(compiler.steps) == compiled_steps, "a timed step compiled a new bucket"
            row = {
                "dtype": dtype,
                "batch": batch,
                "context": len(ids),
                "policy": a.policy,
                "eager_tok_s": max(eager),
                "compiled_tok_s": max(compiled),
                "speedup": max(compiled) / max(eager),
                "warmup_s": warmup_s,
                "eager_rounds": eager,
                "compiled_rounds": compiled,
            }
            rows.append(row)
            print(row, flush=True)
        del engine, seqs, llm
    md = [
        f"# Compiled decode step: {a.model}, {a.policy}, weights {a.weights}",
        "",
        f"Command: `{command()}`",
        "",
        f"Machine: {machine()}, compile mode {a.mode or 'default'}{', freezing' if a.freezing else ''}. Shared 2-core machine with other jobs",
        "running (timings under contention); eager and compiled rounds alternate, best round shown.",
        "Warm-up = the first compiled step of the bucket (dynamo trace + inductor compile + run); the FX",
        "graph cache was enabled, so a warm cache (second run) makes it much shorter.",
        "",
        "| dtype | batch | context | eager tok/s | compiled tok/s | compiled / eager | warm-up s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['dtype']} | {r['batch']} | {r['context']} | {r['eager_tok_s']:.1f} | {r['compiled_tok_s']:.1f} | "
            f"{r['speedup']:.2f} | {r['warmup_s']:.0f} |"
        )
    write_result(
        a.out,
        {"command": command(), "machine": machine(), "mode": a.mode, "weights": a.weights, "rows": rows},
        "\n".join(md),
    )


if __name__ == "__main__":
    main()
