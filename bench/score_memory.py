"""Peak memory and time of policy scoring at the end of a long prefill chunk (`ScoreInputs`).

H2O scores every query of the last chunk against every key. Before the chunked reduction
`attention()` held [Hkv, G*Tq, L] fp32 logits and their softmax at once; now it holds `chunk_bytes`
of logits at a time plus its [Hkv, Tq, L] result, and `attention_mass()` not even that. Each variant
runs in its own subprocess so its peak RSS (ru_maxrss) is its own; `one_shot` is the old formula.

    python bench/score_memory.py --out bench/results/score_memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from common import command, machine, write_result

from longserve.kv.policies import ScoreInputs


def one_shot(inputs: ScoreInputs) -> torch.Tensor:
    q, keys, g = inputs.queries, inputs.keys, inputs.group_size
    hkv, length, _ = keys.shape
    tq = q.shape[1]
    logits = (q.reshape(hkv, g * tq, -1) @ keys.transpose(1, 2)).float() * inputs.scaling
    q_pos = torch.arange(length - tq, length).repeat(g)
    logits = logits.masked_fill(torch.arange(length)[None, :] > q_pos[:, None], float("-inf"))
    return logits.softmax(-1).view(hkv, g, tq, length).mean(1).sum(1)


def child(variant: str, hq: int, hkv: int, tq: int, length: int, dtype: str) -> None:
    dt = getattr(torch, dtype)
    keys = torch.randn(hkv, length, 64).to(dt)
    inputs = ScoreInputs(0, torch.randn(hq, tq, 64).to(dt), keys, keys, torch.arange(length), 0.125)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = {
        "one_shot": lambda: one_shot(inputs),
        "attention().sum(1)": lambda: inputs.attention().sum(1),
        "attention_mass()": inputs.attention_mass,
    }[variant]
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "seconds": seconds, "extra_peak_mib": (peak - base) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="9,3", help="query heads, KV heads (SmolLM2-135M)")
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length L = last chunk Tq")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--child", nargs="*")
    ap.add_argument("--out", default="bench/results/score_memory")
    a = ap.parse_args()
    if a.child:
        v, hq, hkv, tq, length, dtype = a.child
        child(v, int(hq), int(hkv), int(tq), int(length), dtype)
        return
    hq, hkv = map(int, a.shape.split(","))
    rows = []
    for variant in ("one_shot", "attention().sum(1)", "attention_mass()"):
        args = [variant, str(hq), str(hkv), str(a.tokens), str(a.tokens), a.dtype]
        out = subprocess.run(
            [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    md = [
        f"# Policy scoring memory: last chunk of {a.tokens} queries x {a.tokens} keys, {hq}/{hkv} heads, {a.dtype}",
        "",
        f"Command: `{command()}`",
        "",
        f"Machine: {machine()}. Shared 2-core machine under load. Peak = RSS growth of a fresh process",
        f"during the call (inputs excluded); `chunk_bytes` = {ScoreInputs.chunk_bytes >> 20} MiB.",
        "",
        "| variant | seconds | extra peak MiB |",
        "|---|---|---|",
        *[f"| `{r['variant']}` | {r['seconds']:.2f} | {r['extra_peak_mib']:.0f} |" for r in rows],
    ]
    write_result(a.out, {"command": command(), "machine": machine(), "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
