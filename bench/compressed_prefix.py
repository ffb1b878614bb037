"""Compressed prefix entries end to end: the natural-text needle suite through `cache_prefix`, the context
in a system turn (the prefix) and the question in the user turn. Per policy: accuracy of the request that
*reuses* the cached prefix (a second, identical question after the miss that made it), the entry's bytes,
how many such prefixes fit in the cache budget vs the uncompressed entries, and TTFT miss vs hit.

    python bench/compressed_prefix.py --model smollm2-135m-instruct --n 10 --tokens 2048 \
        --policies full,kvzip@0.25,snapkv@0.25,expected_attention@0.25
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import command, fmt, machine, write_result  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from longserve import LLM  # noqa: E402
from longserve.eval.metrics import score  # noqa: E402
from longserve.eval.natural import natural_single  # noqa: E402
from longserve.units import parse_count  # noqa: E402


def spec_of(text: str) -> dict:
    name, _, ratio = text.partition("@")
    return {"policy": name, **({"ratio": float(ratio)} if ratio else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--tokens", default="2048")
    ap.add_argument("--policies", default="full,kvzip@0.25,snapkv@0.25,expected_attention@0.25")
    ap.add_argument("--budget", default="256MiB", help="prefix cache budget the capacity column refers to")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/compressed_prefix")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, progress=False, prefix_cache=args.budget)
    count = lambda text: len(llm.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    rng = random.Random(0)
    samples = [natural_single(rng, parse_count(args.tokens), count) for _ in range(args.n)]
    rows = []
    for text in args.policies.split(","):
        spec, right, entry_bytes, miss_ttft, hit_ttft = spec_of(text), 0, [], [], []
        for sample in tqdm(samples, desc=text, unit="sample"):
            messages = [
                {"role": "system", "content": sample.context},
                {"role": "user", "content": sample.question.strip()},
            ]
            miss = llm.generate(messages, max_new_tokens=sample.max_new_tokens, cache_prefix=spec)[0]
            entry_bytes.append(next(reversed(llm.prefix_cache.entries.values())).nbytes)  # the newest
            start = time.perf_counter()
            hit = llm.generate(messages, max_new_tokens=sample.max_new_tokens, cache_prefix=spec)[0]
            hit_ttft.append(hit.stats["ttft_s"] or time.perf_counter() - start)
            miss_ttft.append(miss.stats["ttft_s"])
            assert hit.stats["cached_prompt_tokens"] > 0, "the second request did not reuse the prefix"
            right += score(sample.metric, hit.text, sample.answers) >= 1.0
        rows.append(
            {
                "policy": text,
                "n": len(samples),
                "correct": right,
                "entry_bytes_mean": statistics.mean(entry_bytes),
                "ttft_miss_p50_s": statistics.median(miss_ttft),
                "ttft_hit_p50_s": statistics.median(hit_ttft),
            }
        )
        llm.prefix_cache.__init__(llm.prefix_cache.max_bytes, llm.fingerprint)  # empty between policies
    full = next((r for r in rows if r["policy"] == "full"), rows[0])
    for r in rows:
        r["entries_in_budget"] = int(llm.prefix_cache.max_bytes // r["entry_bytes_mean"])
        r["entries_vs_full"] = full["entry_bytes_mean"] / r["entry_bytes_mean"]
        r["accuracy_vs_full"] = r["correct"] / full["correct"] if full["correct"] else None
    lines = [
        f"# Compressed prefix entries: natural-text single needle, {args.tokens} tokens, {args.model}",
        "",
        f"`{command()}`  ",
        f"{machine()}, {args.dtype}; context = system turn (cached, compressed), question = user turn.",
        "",
        f"| policy | n | correct (hit) | vs full | entry MiB | entries in {args.budget} | x full | TTFT miss | TTFT hit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['n']} | {r['correct']}/{r['n']} | {fmt(r['accuracy_vs_full'], '.0%')} | "
            f"{r['entry_bytes_mean'] / 2**20:.1f} | {r['entries_in_budget']} | {r['entries_vs_full']:.1f}x | "
            f"{r['ttft_miss_p50_s']:.2f} s | {r['ttft_hit_p50_s']:.2f} s |"
        )
    write_result(args.out, {"args": vars(args), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
