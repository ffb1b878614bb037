"""Per-layer prefill attention time: the masked SDPA path (before issue 18) vs the mask-free LSE merge.

A prompt of N tokens runs in chunks of C: chunk i attends to the i*C cached tokens before it and to
itself causally. The time is one layer's attention summed over the chunks (no projections, no cache
writes), the minimum over `--repeats` rounds in which the methods alternate, so both see the same
load. Methods:
  - masked: one SDPA call over [prefix; chunk] with a boolean mask, `enable_gqa` (the old path);
  - masked_rep: the same with K/V repeated to the query heads first;
  - lse: `attention_kernels.chunk_attention` (prefix unmasked + chunk `is_causal`, LSE merge,
    native GQA in the CPU flash op) -- what `PrefillBackend` runs now;
  - lse_rep: the same with K/V repeated first (is repeating worth it?).
`--window` adds sliding-window rows (Gemma3-style) for the `lse` path's blocked masked fallback.

    python bench/attention_kernels.py --out bench/results/attention_kernels
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import command, fmt, machine, write_result

from longserve.kv import attention_kernels as kernels

SHAPES = {"smollm2-135m": (9, 3, 64), "qwen2.5-0.5b": (14, 2, 64), "gemma3-270m": (4, 1, 256)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rep(x: torch.Tensor, g: int, dim: int) -> torch.Tensor:
    return x.repeat_interleave(g, dim)


def methods(hq: int, hkv: int, window: int | None):
    g = hq // hkv

    def masked(q, k, v, pk, pv, qp, pp, s):
        return kernels.masked_attention(q, k, v, pk, pv, qp, pp, s, window)

    def masked_rep(q, k, v, pk, pv, qp, pp, s):
        return kernels.masked_attention(
            q, _rep(k, g, 1), _rep(v, g, 1), _rep(pk, g, 0), _rep(pv, g, 0), qp, pp, s, window
        )

    def lse(q, k, v, pk, pv, qp, pp, s):
        return kernels.chunk_attention(q, k, v, pk, pv, qp, pp, s, window)

    def lse_rep(q, k, v, pk, pv, qp, pp, s):
        return kernels.chunk_attention(
            q, _rep(k, g, 1), _rep(v, g, 1), _rep(pk, g, 0), _rep(pv, g, 0), qp, pp, s, window
        )

    out = {"masked": masked, "lse": lse}
    if g > 1:
        out |= {"masked_rep": masked_rep, "lse_rep": lse_rep}
    return out


def chunks(hq, hkv, d, n, c, dtype, window):
    """The (q, k, v, prefix k, prefix v, positions, prefix positions) of each chunk of one layer."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(hkv, n, d, generator=gen).to(dtype)
    values = torch.randn(hkv, n, d, generator=gen).to(dtype)
    queries = torch.randn(1, hq, n, d, generator=gen).to(dtype)
    pos = torch.arange(n)
    out = []
    for s in range(0, n, c):
        e = min(s + c, n)
        lo = max(0, s - window) if window else 0  # a sliding layer's ring holds the last `window` tokens
        out.append(
            (
                queries[:, :, s:e],
                keys[None, :, s:e],
                values[None, :, s:e],
                keys[:, lo:s],
                values[:, lo:s],
                pos[s:e],
                pos[lo:s].expand(hkv, -1),
            )
        )
    return out


def bench_case(shape, dtype, n, c, window, repeats):
    hq, hkv, d = SHAPES[shape]
    scale = d**-0.5
    data = chunks(hq, hkv, d, n, c, DTYPES[dtype], window)
    fns = methods(hq, hkv, window)
    ref = [fns["masked"](*x, scale).float() for x in data]
    err = {
        name: max(float((f(*x, scale).float() - r).abs().max()) for x, r in zip(data, ref, strict=True))
        for name, f in fns.items()
    }
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, f in fns.items():
            start = time.perf_counter()
            for x in data:
                f(*x, scale)
            best[name] = min(best[name], time.perf_counter() - start)
    ms = {k: v * 1e3 for k, v in best.items()}
    return {
        "shape": shape,
        "heads": [hq, hkv, d],
        "dtype": dtype,
        "tokens": n,
        "chunk": c,
        "window": window,
        "ms": ms,
        "speedup": ms["masked"] / ms["lse"],
        "max_abs_diff_vs_masked": err,
    }


def decode_case(shape: str, dtype: str, batch: int, length: int, repeats: int) -> dict:
    """One decode step of one layer at `batch` x `length` cached tokens: where the time goes.
    `read` is a pure read pass over the same K/V bytes (sum), the floor any kernel pays."""
    hq, hkv, d = SHAPES[shape]
    g, dt = hq // hkv, DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    pool_k = torch.randn(batch, hkv, length + 64, d, generator=gen).to(dt)  # a pool slot is longer
    pool_v = torch.randn(batch, hkv, length + 64, d, generator=gen).to(dt)
    k, v = pool_k[:, :, :length], pool_v[:, :, :length]
    qg = torch.randn(batch, hkv, g, d, generator=gen).to(dt)
    ragged = (torch.arange(length)[None, :] < (length - 7 * torch.arange(batch))[:, None])[:, None, None, :]
    s = d**-0.5

    def matmul():
        return ((qg @ k.transpose(-1, -2)).float() * s).softmax(-1).to(dt) @ v

    def split(n=4):  # flash-decoding: the sequence in n parts, merged by LSE
        step = -(-length // n)
        parts = [
            kernels.flash_lse(qg, k[:, :, i : i + step], v[:, :, i : i + step], False, s)
            for i in range(0, length, step)
        ]
        return kernels.merge(parts, dt)

    fns = {
        "sdpa_rows": lambda: F.scaled_dot_product_attention(qg, k, v, scale=s),  # what DecodeBackend runs
        "sdpa_rows_ragged": lambda: F.scaled_dot_product_attention(qg, k, v, attn_mask=ragged, scale=s),
        "sdpa_heads_gqa": lambda: F.scaled_dot_product_attention(
            qg.reshape(batch, hq, 1, d), k, v, scale=s, enable_gqa=True
        ),
        "matmul": matmul,
        "split4_lse": split,
        "read": lambda: (k.sum(), v.sum()),
    }
    ref = fns["sdpa_rows"]().float()
    err = {
        n: float((f().float().reshape(ref.shape) - ref).abs().max())
        for n, f in fns.items()
        if n not in ("read", "sdpa_rows_ragged")
    }
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, f in fns.items():
            start = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - start)
    nbytes = 2 * k.numel() * k.element_size()
    return {
        "shape": shape,
        "dtype": dtype,
        "batch": batch,
        "tokens": length,
        "kv_mb": nbytes / 1e6,
        "ms": {n: t * 1e3 for n, t in best.items()},
        "gb_s": {n: nbytes / t / 1e9 for n, t in best.items()},
        "max_abs_diff_vs_sdpa_rows": err,
    }


def decode_markdown(rows: list[dict]) -> list[str]:
    names = list(rows[0]["ms"])
    md = [
        "",
        "## Decode attention per layer (one step, batch x tokens cached)",
        "",
        "ms per layer (GB/s of K/V read in brackets); `read` = a plain read pass over the same bytes.",
        "",
        "| shape | dtype | batch | tokens | KV MB | " + " | ".join(names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = " | ".join(f"{r['ms'][n]:.2f} ({r['gb_s'][n]:.1f})" for n in names)
        md.append(
            f"| {r['shape']} | {r['dtype']} | {r['batch']} | {r['tokens']} | {r['kv_mb']:.1f} | {cells} |"
        )
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="smollm2-135m,qwen2.5-0.5b")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--chunks", default="512,2048")
    ap.add_argument("--window", type=int, default=512, help="sliding rows (gemma3-270m shape); 0: none")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--decode", default="8x4096", help="decode rows BATCHxTOKENS,...; empty: none")
    ap.add_argument("--prefill", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default="bench/results/attention_kernels")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cases = []
    for shape in a.shapes.split(","):
        for dtype in a.dtypes.split(","):
            for n in map(int, a.lengths.split(",")):
                for c in map(int, a.chunks.split(",")):
                    if c <= n:
                        cases.append((shape, dtype, n, c, None))
    if a.window:
        for dtype in a.dtypes.split(","):
            for n in map(int, a.lengths.split(",")):
                cases.append(("gemma3-270m", dtype, n, min(map(int, a.chunks.split(","))), a.window))
                cases.append(("gemma3-270m", dtype, n, n, a.window))
    rows = []
    for case in cases if a.prefill else []:
        rows.append(bench_case(*case, a.repeats))
        print(
            rows[-1]["shape"],
            rows[-1]["dtype"],
            rows[-1]["tokens"],
            rows[-1]["chunk"],
            rows[-1]["ms"],
            flush=True,
        )
    md = [
        "# Attention kernels per layer (issue 18 part 3)",
        "",
        f"Command: `{command()}`",
        "",
        f"Machine: {machine()}. Shared 2-core machine, other jobs running (timings are under contention;",
        "each figure is the minimum over rounds in which the methods alternate).",
    ]
    prefill_md = [
        "",
        "## Prefill: masked SDPA vs mask-free LSE merge",
        "",
        "Time = one layer's attention summed over the prompt's chunks, no projections or cache writes.",
        "",
        "Reading: the gain grows with the chunk (the masked kernel's extra cost is over the chunk's",
        "[T, P + T] mask; the LSE path runs the unmasked flash kernel on the prefix and `is_causal` on",
        "the chunk). At chunk 512 the prefix part dominates both paths and ratios of 0.85-1.2 are",
        "within this machine's noise. `*_rep` (K/V repeated to the query heads) is not clearly faster than the",
        "flash op's native GQA in any row (at most ~10%, within noise), so nothing is repeated. Sliding rows at chunk 512 take the",
        "blocked masked path (the window cuts every chunk after the first), about the old cost; at",
        "chunk = prompt the blocks see at most prefix + 2 windows of keys instead of the whole prompt",
        "(3.3-3.5x at 4k); at 1k = 2 windows the blocks' per-block masks cost about what they save.",
        "",
        "| shape (Hq/Hkv/D) | dtype | tokens | chunk | window | masked ms | masked_rep ms | lse ms | lse_rep ms "
        "| masked / lse | max diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        prefill_md.append(
            f"| {r['shape']} ({'/'.join(map(str, r['heads']))}) | {r['dtype']} | {r['tokens']} | {r['chunk']} | "
            f"{r['window'] or '-'} | {ms['masked']:.1f} | {fmt(ms.get('masked_rep'), '.1f')} | {ms['lse']:.1f} | "
            f"{fmt(ms.get('lse_rep'), '.1f')} | {r['speedup']:.2f} | {r['max_abs_diff_vs_masked']['lse']:.1e} |"
        )
    if rows:
        md += prefill_md
    decode = []
    for spec in filter(None, a.decode.split(",")):
        batch, length = map(int, spec.split("x"))
        for shape in a.shapes.split(","):
            for dtype in a.dtypes.split(","):
                decode.append(decode_case(shape, dtype, batch, length, max(a.repeats, 5)))
                print(decode[-1]["shape"], decode[-1]["dtype"], decode[-1]["ms"], flush=True)
    if decode:
        md += decode_markdown(decode)
    result = {"command": command(), "machine": machine(), "rows": rows, "decode": decode}
    write_result(a.out, result, "\n".join(md))


if __name__ == "__main__":
    main()
