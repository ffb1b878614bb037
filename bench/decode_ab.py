"""Batch-1 decode, longserve vs llama.cpp, in one script with alternating rounds: the ratio comes from the
same minutes on the same machine, on the same token ids (natural prose from standard-library docstrings).

llama.cpp (the `xllamacpp` server, the zoo's GGUF: Q4-class) stays up; each round times it, then every
longserve configuration (`--configs`, `WEIGHTS:POLICY[:compile]`). longserve decodes in-process (the
engine's own decode step, after a prefill of the same ids); llama.cpp's figure is its own
`timings.predicted_per_second` for a streamed greedy completion with `ignore_eos`. Both use `--threads`.
A `snapstream@N` policy whose budget covers the context is lossless (nothing is evicted): it is how the
compiled step, which needs a fixed-size slot, runs the same cache as `full`.

    OMP_WAIT_POLICY=PASSIVE python bench/decode_ab.py --lengths 1024,8192 --rounds 3 \\
        --configs bf16:full,int4:full,int4:snapstream@AUTO:compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import httpx
import torch
from common import command, machine, write_result
from decode_throughput import bandwidth, load, measure_times, prepare, rss
from prefix_repeat import documents

from longserve.engine.compiled_decode import StepCompiler
from longserve.proxy.llamacpp import LlamaCppServer, gguf_path


def llamacpp_decode(url: str, ids: list[int], n_predict: int) -> float:
    body = {"prompt": ids, "max_tokens": n_predict, "temperature": 0, "ignore_eos": True, "stream": True}
    timings: dict = {}
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                timings = json.loads(line[6:]).get("timings", timings)
    return float(timings["predicted_per_second"])


def policy_for(spec: str, length: int, steps: int) -> str:
    """`snapstream@AUTO` -> a budget that holds the whole context (lossless)."""
    return spec.replace("@AUTO", f"@{length + steps + 8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="1024,8192")
    ap.add_argument("--configs", default="bf16:full,int4:full,int4:snapstream@AUTO:compile")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/decode_ab")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    configs = [c.split(":") for c in args.configs.split(",")]
    llms = {}
    for weights, *_ in configs:
        if weights not in llms:
            llms[weights] = load(args.model, weights)
    tokenizer = next(iter(llms.values()))[0].tokenizer
    prompts = {n: documents(tokenizer, 1, n - args.steps - 24)[0] for n in lengths}  # fits the window
    gguf = gguf_path(args.model)
    samples: dict[tuple, list[float]] = {}
    warmups: dict[tuple, float] = {}
    compilers: dict[str, StepCompiler] = {}
    n_ctx = max(lengths) + args.steps + 64
    with LlamaCppServer(gguf, n_ctx=n_ctx, threads=args.threads, startup_timeout_s=300) as srv:
        for rnd in range(args.rounds):
            for length in lengths:
                ids = prompts[length]
                samples.setdefault(("llama.cpp", length), []).append(
                    llamacpp_decode(srv.url, ids, args.steps)
                )
                for weights, spec, *flags in configs:
                    llm = llms[weights][0]
                    if "compile" in flags and weights not in compilers:
                        compilers[weights] = StepCompiler(llm.loaded.model)
                    llm.compiler = compilers[weights] if "compile" in flags else None
                    policy = policy_for(spec, len(ids), args.steps)
                    engine, seqs, _ = prepare(llm, ids, policy, 1, args.steps)
                    name = ":".join([weights, spec, *flags])
                    if llm.compiler is not None and (name, length) not in warmups:
                        start = time.perf_counter()
                        engine.runner.decode(seqs)  # compiles this bucket once (FX-graph cache on disk)
                        warmups[(name, length)] = time.perf_counter() - start
                    wall, _cpu = measure_times(engine, seqs, args.steps)
                    samples.setdefault((name, length), []).append(wall)
                    del engine, seqs
                print(
                    json.dumps(
                        {
                            "round": rnd,
                            "length": length,
                            **{k[0]: v[-1] for k, v in samples.items() if k[1] == length},
                        }
                    ),
                    flush=True,
                )
    bw = bandwidth()
    rows = []
    for (name, length), values in samples.items():
        ref = statistics.median(samples[("llama.cpp", length)])
        med = statistics.median(values)
        facts = llms[name.split(":")[0]][1] if name != "llama.cpp" else {}
        bound = bw / facts["read_bytes_per_token"] if facts else None
        rows.append(
            {
                "engine": name,
                "context": length,
                "tok_s_median": med,
                "tok_s": values,
                "ratio_vs_llamacpp": med / ref,
                "weight_bytes": facts.get("weight_bytes"),
                "fraction_of_bandwidth_bound": med / bound if bound else None,
                "compile_warmup_s": warmups.get((name, length)),
            }
        )
    meta = {
        "command": command(),
        "machine": machine(),
        "gguf": gguf.name,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
        "bandwidth_gb_s": bw / 1e9,
        "load_average": os.getloadavg(),
        "peak_rss_mib": (rss("VmHWM") or 0) / 2**20,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    lines = [
        f"# Batch-1 decode, longserve vs llama.cpp ({args.model}; llama.cpp on `{gguf.name}`), same run",
        "",
        f"`{meta['command']}`  ",
        f"{meta['machine']}; {args.threads} threads each; {args.rounds} alternating rounds of {args.steps} "
        f"tokens; natural-prose prompt (stdlib docstrings), the same token ids for both; measured bandwidth "
        f"{meta['bandwidth_gb_s']:.1f} GB/s; load average at the end {meta['load_average'][0]:.1f} "
        f"({meta['date']}).",
        "",
        "| engine | context | decode tok/s (median) | rounds | vs llama.cpp | of bandwidth bound |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["context"], r["engine"] != "llama.cpp")):
        frac = "-" if r["fraction_of_bandwidth_bound"] is None else f"{r['fraction_of_bandwidth_bound']:.0%}"
        spread = ", ".join(f"{v:.1f}" for v in r["tok_s"])
        lines.append(
            f"| {r['engine']} | {r['context']} | {r['tok_s_median']:.1f} | {spread} | "
            f"{r['ratio_vs_llamacpp']:.2f}x | {frac} |"
        )
    if warmups:
        lines += [
            "",
            "Compile warm-up (first decode step per bucket): "
            + ", ".join(f"{n} @ {length}: {s:.0f} s" for (n, length), s in warmups.items()),
        ]
    write_result(args.out, {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
