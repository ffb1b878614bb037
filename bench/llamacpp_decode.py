"""The outside reference for decode speed: llama.cpp's server (PyPI `xllamacpp`, CPU build) on the same
SmolLM2 GGUF, B concurrent sequences at a given context, 2 threads.

Decode speed comes from llama.cpp's own per-request `timings` (predicted tokens / predicted ms); with B
sequences decoding together, aggregate = sum(predicted tokens) / longest predicted time.

    python bench/llamacpp_decode.py --lengths 1024,4096,8192 --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from longserve.proxy.llamacpp import LlamaCppServer, gguf_path

FILLER = "The grass is green. The sky is blue. The sun is yellow. "


def run(url: str, prompt: str, batch: int, n_predict: int) -> dict:
    def one(i: int) -> dict:
        body = {"prompt": f"{i} {prompt}", "max_tokens": n_predict, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/completions", json=body, timeout=3600)
        r.raise_for_status()
        return r.json()["timings"]

    with ThreadPoolExecutor(batch) as pool:
        timings = list(pool.map(one, range(batch)))
    tokens = sum(t["predicted_n"] for t in timings)
    longest_s = max(t["predicted_ms"] for t in timings) / 1000
    return {"batch": batch, "prompt_tokens": timings[0]["prompt_n"], "decode_tok_s": tokens / longest_s,
            "per_sequence_tok_s": sum(t["predicted_per_second"] for t in timings) / batch,
            "prefill_tok_s": sum(t["prompt_per_second"] for t in timings) / batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-predict", type=int, default=32)
    ap.add_argument("--out", default="bench/results/llamacpp_decode")
    args = ap.parse_args()
    gguf = gguf_path()
    rows = []
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    for batch in batches:
        n_ctx = batch * (max(lengths) + args.n_predict + 64)
        with LlamaCppServer(gguf, n_ctx=n_ctx, threads=args.threads, parallel=batch, startup_timeout_s=120) as srv:
            for length in lengths:
                prompt = (FILLER * (length // 12 + 10))
                # trim to about `length` tokens with the server's own tokenizer
                ids = httpx.post(srv.url.removesuffix("/v1") + "/tokenize", json={"content": prompt}).json()["tokens"]
                text = httpx.post(srv.url.removesuffix("/v1") + "/detokenize",
                                  json={"tokens": ids[: length - 40]}).json()["content"]
                row = {"context": length, **run(srv.url, text, batch, args.n_predict)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"command": " ".join(["python", *sys.argv]), "gguf": gguf.name, "threads": args.threads,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# llama.cpp decode reference ({gguf.name}, {args.threads} threads)", "",
             f"Command: `{meta['command']}` ({meta['date']})", "",
             "| context | batch | decode tok/s (aggregate) | per sequence | prefill tok/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['batch']} | {r['decode_tok_s']:.1f} | {r['per_sequence_tok_s']:.1f} | "
              f"{r['prefill_tok_s']:.0f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
