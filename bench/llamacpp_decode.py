"""The outside reference for decode speed: llama.cpp's server (PyPI `xllamacpp`, CPU build) on the same
SmolLM2 GGUF, B concurrent sequences at a given context, 2 threads.

Aggregate decode speed counts the streamed tokens that arrive while all B sequences are decoding, over
that window; `per sequence` is llama.cpp's own `timings.predicted_per_second` (which, with B > 1, also
counts time spent waiting for other slots' prefill).

    python bench/llamacpp_decode.py --lengths 1024,4096,8192 --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from common import command, write_result

from longserve.proxy.llamacpp import LlamaCppServer, gguf_path

FILLER = "The grass is green. The sky is blue. The sun is yellow. "


def run(url: str, prompt: str, batch: int, n_predict: int) -> dict:
    """Stream B requests; aggregate decode speed = tokens that arrive while *all* B sequences are past their
    prefill, over that window (llama.cpp interleaves other slots' prefill with decode, so its per-request
    `predicted_ms` would count waiting time)."""

    def one(i: int) -> tuple[list[float], dict]:
        body = {
            "prompt": f"{i} {prompt}",
            "max_tokens": n_predict,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        stamps, timings = [], {}
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=3600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
                timings = chunk.get("timings", timings)
        return stamps, timings

    with ThreadPoolExecutor(batch) as pool:
        results = list(pool.map(one, range(batch)))
    start = max(stamps[0] for stamps, _ in results)  # every sequence is decoding from here on
    end = min(stamps[-1] for stamps, _ in results)
    window = [t for stamps, _ in results for t in stamps if start < t <= end]
    timings = [t for _, t in results]
    return {
        "batch": batch,
        "prompt_tokens": timings[0].get("prompt_n"),
        "decode_tok_s": len(window) / (end - start) if end > start else float("nan"),
        "tokens_in_window": len(window),
        "per_sequence_tok_s": sum(t.get("predicted_per_second", 0) for t in timings) / batch,
        "prefill_tok_s": sum(t.get("prompt_per_second", 0) for t in timings) / batch,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("--out", default="bench/results/llamacpp_decode")
    args = ap.parse_args()
    gguf = gguf_path()
    rows = []
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    for batch in batches:
        n_ctx = batch * (max(lengths) + args.n_predict + 64)
        with LlamaCppServer(
            gguf, n_ctx=n_ctx, threads=args.threads, parallel=batch, startup_timeout_s=120
        ) as srv:
            for length in lengths:
                prompt = FILLER * (length // 12 + 10)
                # trim to about `length` tokens with the server's own tokenizer
                ids = httpx.post(srv.url.removesuffix("/v1") + "/tokenize", json={"content": prompt}).json()[
                    "tokens"
                ]
                text = httpx.post(
                    srv.url.removesuffix("/v1") + "/detokenize", json={"tokens": ids[: length - 40]}
                ).json()["content"]
                row = {"context": length, **run(srv.url, text, batch, args.n_predict)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {
        "command": command(),
        "gguf": gguf.name,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    lines = [
        f"# llama.cpp decode reference ({gguf.name}, {args.threads} threads)",
        "",
        f"Command: `{meta['command']}` ({meta['date']})",
        "",
        "| context | batch | decode tok/s (aggregate) | per sequence | prefill tok/s |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['context']} | {r['batch']} | {r['decode_tok_s']:.1f} | {r['per_sequence_tok_s']:.1f} | "
        f"{r['prefill_tok_s']:.0f} |"
        for r in rows
    ]
    write_result(args.out, {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
