"""The compressing proxy in front of llama.cpp's own server: TTFT with and without the proxy, same requests.

llama.cpp's server (xllamacpp wheel) serves a zoo GGUF in a child process with prompt caching off, so
every request prefills from scratch. Each synthetic-suite prompt is sent twice, streaming, alternating
the order per sample: straight to llama.cpp, and through `longserve proxy` (draft scoring + upstream
prefill of the kept part). TTFT is client-side time to the first content chunk; accuracy uses the suite's
metric; prompt sizes are the upstream's own usage counts.

Full size (the defaults): .venv/bin/python bench/proxy_bench.py
Smoke test:  .venv/bin/python bench/proxy_bench.py --upstream-model smollm2-135m-instruct --lengths 512 \\
                 --samples 1 --tasks niah_single_1 --out bench/results/proxy_bench_smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch
from common import command, write_result

from longserve.eval.runner import score_sample
from longserve.eval.suite import make_suite
from longserve.llm import LLM
from longserve.proxy.app import HEADER, ProxyConfig, create_proxy_app
from longserve.proxy.cli import load_tokenizer
from longserve.proxy.llamacpp import LlamaCppServer, gguf_path
from longserve.server.background import BackgroundServer
from longserve.specprefill import SpecPrefillConfig, SpeculativePrefill


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--upstream-model",
        default="qwen2.5-coder-1.5b-instruct",
        help="zoo model whose GGUF llama.cpp serves (its tokenizer measures lengths and keep rates)",
    )
    p.add_argument("--gguf", help="serve this GGUF instead (lengths are then counted in the draft's tokens)")
    p.add_argument("--draft", default="smollm2-135m-instruct")
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--lengths", default="1024,4096", help="comma-separated prompt lengths (upstream tokens)")
    p.add_argument("--samples", type=int, default=3, help="samples per task and length")
    p.add_argument("--tasks", default="niah_single_1,niah_multikey")
    p.add_argument(
        "--max-tokens", type=int, default=64, help="answer length cap (each task's own length when shorter)"
    )
    p.add_argument("--llama-threads", type=int, default=1, help="llama.cpp threads")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the draft")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the draft's weights")
    p.add_argument("--out", default="bench/results/proxy_bench", help="output path without extension")
    return p.parse_args(argv)


def stream_ttft(url: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "cache_prompt": False,
    }
    start = time.perf_counter()
    first, pieces, usage, sizes = None, [], {}, None
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        sizes = r.headers.get(HEADER)
        for line in r.iter_lines():
            if not line.startswith("data:") or "[DONE]" in line:
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter()
                pieces.append(piece)
    end = time.perf_counter()
    return {
        "ttft_s": (first or end) - start,
        "latency_s": end - start,
        "text": "".join(pieces),
        "upstream_prompt_tokens": usage.get("prompt_tokens"),
        "sizes": sizes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    draft = LLM(args.draft, dtype=args.dtype, progress=False)
    tok = draft.tokenizer if args.gguf else load_tokenizer(args.upstream_model)

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    samples = make_suite(args.tasks.split(","), args.samples, lengths, count)
    gguf = Path(args.gguf) if args.gguf else gguf_path(args.upstream_model, progress=True)
    n_ctx = max(lengths) + 512
    sp = SpeculativePrefill(draft, SpecPrefillConfig(keep=args.keep))
    records = []
    with LlamaCppServer(gguf, n_ctx=n_ctx, threads=args.llama_threads, startup_timeout_s=120) as llama:
        config = ProxyConfig(llama.url, keep=args.keep, min_tokens=256)
        with BackgroundServer(create_proxy_app(config, sp, target_tokenizer=tok)) as server:
            proxy_url = server.url
            stream_ttft(llama.url, "Warm-up.", 2)
            stream_ttft(proxy_url + "/v1", "Warm-up.", 2)
            for i, sample in enumerate(samples):
                prompt = sample.context + sample.question
                order = [("direct", llama.url), ("proxy", proxy_url + "/v1")]
                for route, url in order if i % 2 == 0 else order[::-1]:
                    res = stream_ttft(url, prompt, min(args.max_tokens, sample.max_new_tokens))
                    score = score_sample(sample, res["text"])
                    records.append(
                        {
                            "sample": sample.id,
                            "length": sample.target_tokens,
                            "route": route,
                            "score": score,
                            **res,
                        }
                    )
                    print(
                        f"[{i + 1}/{len(samples)}] {sample.id} {route}: TTFT {res['ttft_s']:.2f} s, "
                        f"upstream prompt {res['upstream_prompt_tokens']} tok, score {score:.2f}",
                        file=sys.stderr,
                    )
        startup_s = llama.startup_s

    rows = []
    for length in lengths:
        by = {
            route: [r for r in records if r["length"] == length and r["route"] == route]
            for route in ("direct", "proxy")
        }
        direct_ttft = statistics.mean(r["ttft_s"] for r in by["direct"])
        for route, sel in by.items():
            ttft = statistics.mean(r["ttft_s"] for r in sel)
            rows.append(
                {
                    "length": length,
                    "route": route,
                    "n": len(sel),
                    "ttft_s": ttft,
                    "ttft_ratio": ttft / direct_ttft,
                    "upstream_prompt_tokens": statistics.mean(r["upstream_prompt_tokens"] or 0 for r in sel),
                    "accuracy": statistics.mean(r["score"] for r in sel),
                }
            )
    info = (
        f"{platform.machine()}, llama.cpp {args.llama_threads} thread(s) (xllamacpp), draft on "
        f"{args.threads} torch thread(s) in {args.dtype}, torch {torch.__version__}"
    )
    result = {
        "command": command(argv),
        "gguf": str(gguf),
        "draft": args.draft,
        "keep": args.keep,
        "lengths": lengths,
        "tasks": args.tasks.split(","),
        "samples_per_task": args.samples,
        "machine": info,
        "llama_startup_s": startup_s,
        "summary": rows,
        "records": records,
    }
    lines = [
        "# Compressing proxy in front of llama.cpp's server",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Upstream: llama.cpp server (xllamacpp) serving `{gguf.name}`, prompt cache off; proxy draft "
        f"`{args.draft}`, keep {args.keep:g}; {info}. TTFT = client time to the first streamed token "
        "(through the proxy: draft scoring + upstream prefill of the kept text).",
        "",
        "| length | route | TTFT (s) | vs direct | upstream prompt tokens | accuracy | n |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['route']} | {r['ttft_s']:.2f} | {r['ttft_ratio']:.2f}x | "
            f"{r['upstream_prompt_tokens']:.0f} | {r['accuracy']:.2f} | {r['n']} |"
        )
    write_result(args.out, result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
