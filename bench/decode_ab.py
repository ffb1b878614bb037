"""Batch-1 decode, longserve vs llama.cpp, in one script with alternating rounds: the ratio comes from the
same minutes on the same machine, on the same token ids (natural prose from standard-library docstrings).

llama.cpp (the `xllamacpp` server, the zoo's GGUF: Q4-class) stays up; each round times it, then every
longserve configuration (`--configs`, `WEIGHTS:POLICY[:FLAG...]`). longserve decodes in-process (the
engine's own decode step, after a prefill of the same ids); llama.cpp's figure is its own
`timings.predicted_per_second` for a streamed greedy completion with `ignore_eos`. Both use `--threads`.

Flags: `compiled` runs the compiled decode step (`StepCompiler`; `compile` is the same), `autotune` its
`max-autotune-no-cudagraphs` mode, `freezing` inductor's freezing (weights folded into the graph). Each
(weights, mode, freezing) gets one compiler; its first step per context length (trace + compile + run)
is timed apart as the warm-up and is not in tok/s, and a timed step that compiled a new graph is an
error. `--profile` adds a torch.profiler breakdown of each compiled configuration's step (top ops by
self CPU time, over `--steps` steps at each length). A `snapstream@AUTO` policy (budget = the context)
is lossless: the same cache as `full` through a ring slot.

    OMP_WAIT_POLICY=PASSIVE python bench/decode_ab.py --lengths 1024,8192 --rounds 3 \\
        --configs int4:full,int4:full:compiled,int8:full:compiled:freezing
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


FLAGS = ("compiled", "compile", "autotune", "freezing")


def parse_config(text: str) -> tuple[str, str, tuple[str, ...]]:
    """`WEIGHTS:POLICY[:FLAG...]` -> (weights, policy spec, flags)."""
    weights, _, rest = text.partition(":")
    spec, *flags = rest.split(":")
    bad = [f for f in flags if f not in FLAGS]
    if not spec or bad:
        raise SystemExit(f"config {text!r}: want WEIGHTS:POLICY[:FLAG...] with flags in {', '.join(FLAGS)}")
    return weights, spec, tuple(flags)


def compiler_key(weights: str, flags: tuple[str, ...]) -> tuple | None:
    """(weights, mode, freezing) of a compiled configuration, None for an eager one."""
    if not {"compiled", "compile", "autotune", "freezing"} & set(flags):
        return None
    return weights, "max-autotune-no-cudagraphs" if "autotune" in flags else None, "freezing" in flags


def profile_step(engine, seqs, steps: int, top: int = 8) -> list[dict]:
    """Top ops by self CPU time over `steps` decode steps (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.runner.decode(seqs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "op": e.key,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "calls_per_step": e.count / steps,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:top]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="1024,8192")
    ap.add_argument("--configs", default="bf16:full,int4:full,int4:snapstream@AUTO:compile")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/decode_ab")
    ap.add_argument("--profile", action="store_true", help="profile each compiled configuration's step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    configs = [parse_config(c) for c in args.configs.split(",")]
    llms = {}
    for weights, *_ in configs:
        if weights not in llms:
            llms[weights] = load(args.model, weights)
    tokenizer = next(iter(llms.values()))[0].tokenizer
    prompts = {n: documents(tokenizer, 1, n - args.steps - 24)[0] for n in lengths}  # fits the window
    gguf = gguf_path(args.model)
    samples: dict[tuple, list[float]] = {}
    warmups: dict[tuple, float] = {}
    profiles: dict[tuple, list[dict]] = {}
    compilers: dict[tuple, StepCompiler] = {}
    n_ctx = max(lengths) + args.steps + 64

    def engine_for(weights: str, spec: str, flags: tuple[str, ...], length: int):
        """(name, engine, seqs): the prefilled engine of one configuration, its compiler warm."""
        llm, ids = llms[weights][0], prompts[length]
        key = compiler_key(weights, flags)
        if key is not None and key not in compilers:
            options = {"freezing": True} if key[2] else None
            compilers[key] = StepCompiler(llm.loaded.model, mode=key[1], options=options)
        llm.compiler = compilers.get(key)
        engine, seqs, _ = prepare(llm, ids, policy_for(spec, len(ids), args.steps), 1, args.steps)
        name = ":".join([weights, spec, *flags])
        if llm.compiler is not None and (name, length) not in warmups:
            start = time.perf_counter()
            engine.runner.decode(seqs)  # compiles this bucket once (FX-graph cache on disk)
            warmups[(name, length)] = time.perf_counter() - start
        return name, engine, seqs

    with LlamaCppServer(gguf, n_ctx=n_ctx, threads=args.threads, startup_timeout_s=300) as srv:
        for rnd in range(args.rounds):
            for length in lengths:
                ids = prompts[length]
                samples.setdefault(("llama.cpp", length), []).append(
                    llamacpp_decode(srv.url, ids, args.steps)
                )
                for weights, spec, flags in configs:
                    name, engine, seqs = engine_for(weights, spec, flags, length)
                    compiler = engine.runner.compiler
                    graphs = len(compiler.steps) if compiler is not None else 0
                    wall, _cpu = measure_times(engine, seqs, args.steps)
                    if compiler is not None and len(compiler.steps) != graphs:
                        raise SystemExit(f"{name} @ {length}: a timed step compiled a new graph")
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
    if args.profile:
        for weights, spec, flags in configs:
            if compiler_key(weights, flags) is None:
                continue
            for length in lengths:
                name, engine, seqs = engine_for(weights, spec, flags, length)
                profiles[(name, length)] = profile_step(engine, seqs, args.steps)
                del engine, seqs
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
                "profile": profiles.get((name, length)),
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
    for (name, length), top in profiles.items():
        lines += ["", f"Profile of `{name}` @ {length} (self CPU ms per step, top ops):", ""]
        lines += ["| op | ms/step | calls/step | share |", "|---|---:|---:|---:|"]
        lines += [
            f"| `{e['op']}` | {e['self_ms_per_step']:.2f} | {e['calls_per_step']:.0f} | {e['share']:.0%} |"
            for e in top
        ]
    write_result(args.out, {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
