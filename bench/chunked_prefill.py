"""End-to-end chunked prefill time of a real model: the mask-free attention vs the old masked path.

The old path is restored in the same process by routing `attention_kernels.chunk_attention` to
`masked_attention` for every chunk with a prefix (the first chunk ran `is_causal` before too), and
rounds alternate old / new so both see the same machine load. Full policy, greedy, one sequence.

    python bench/chunked_prefill.py --out bench/results/chunked_prefill
"""

from __future__ import annotations

import argparse
import time

from common import command, machine, write_result

from longserve import LLM
from longserve.engine.sampler import SamplingParams
from longserve.kv import attention_kernels
from longserve.kv.policies import make_policy

NEW = attention_kernels.chunk_attention


def old(q, k, v, pk, pv, q_pos, p_pos, scale, window=None):
    if pk.shape[1] == 0 and window is None:
        return NEW(q, k, v, pk, pv, q_pos, p_pos, scale, window)
    return attention_kernels.masked_attention(q, k, v, pk, pv, q_pos, p_pos, scale, window)


def prefill_s(llm: LLM, ids: list[int]) -> tuple[float, int]:
    engine = llm.engine(1, len(ids) + 4)
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=1, ignore_eos=True), make_policy("full"))
    start = time.perf_counter()
    logits = engine.prefill(seq)
    return time.perf_counter() - start, int(logits.argmax())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results/chunked_prefill")
    a = ap.parse_args()
    llm = LLM(a.model, dtype=a.dtype, prefill_chunk=a.chunk, threads=a.threads, progress=False)
    text = "The grass is green. The sky is blue. The sun is yellow. " * (a.tokens // 6)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)[: a.tokens]
    times: dict[str, list[float]] = {"old": [], "new": []}
    tokens = {}
    for _ in range(a.rounds):
        for name, fn in (("old", old), ("new", NEW)):
            attention_kernels.chunk_attention = fn
            t, tokens[name] = prefill_s(llm, ids)
            times[name].append(t)
            print(name, f"{t:.1f}s", flush=True)
    attention_kernels.chunk_attention = NEW
    best = {k: min(v) for k, v in times.items()}
    result = {
        "command": command(),
        "machine": machine(),
        "model": a.model,
        "dtype": a.dtype,
        "tokens": len(ids),
        "chunk": a.chunk,
        "seconds": times,
        "best_s": best,
        "speedup": best["old"] / best["new"],
        "same_next_token": tokens["old"] == tokens["new"],
    }
    md = "\n".join(
        [
            f"# Chunked prefill, {a.model} {a.dtype}: masked attention vs mask-free (LSE merge)",
            "",
            f"Command: `{command()}`",
            "",
            f"Machine: {machine()}. Shared 2-core machine under load (other jobs); rounds alternate.",
            "",
            "| tokens | chunk | old (masked) s | new (LSE) s | old / new | prefill tok/s old -> new | same next token |",
            "|---|---|---|---|---|---|---|",
            f"| {len(ids)} | {a.chunk} | {best['old']:.1f} | {best['new']:.1f} | {result['speedup']:.2f} | "
            f"{len(ids) / best['old']:.0f} -> {len(ids) / best['new']:.0f} | {result['same_next_token']} |",
        ]
    )
    write_result(a.out, result, md)


if __name__ == "__main__":
    main()
