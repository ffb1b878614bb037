"""Serving throughput: concurrent OpenAI clients against the in-process server, vs sequential HF generate.

For each KV policy (`full`, `snapstream:512`, `snapstream:1024` by default) the server is started in this
process (uvicorn on 127.0.0.1, a free port) and 1, 4, 8, 16 concurrent clients stream `/v1/completions`
for long prompts built from the bundled demo document (token-id prompts, so every engine sees the same
tokens; `ignore_eos` so every request generates exactly `--max-tokens`). Reported: output tokens/s over
the wall time, client-side TTFT p50/p95, and the ratio to sequential Hugging Face `generate` of the same
requests, measured in the same run. Capacity: how many `--capacity-len`-token sequences fit in
`--capacity-memory` of KV under each policy, computed from slot bytes and confirmed by building the pool.

Full size (the defaults): .venv/bin/python bench/serve_throughput.py
Smoke test:              .venv/bin/python bench/serve_throughput.py --clients 1,2 --requests 2 \\
                             --prompt-tokens 600 --max-tokens 8 --policies full,snapstream:512 --hf-requests 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files

import openai
import torch
from common import command, write_result

from longserve.kv.cache import KVPool
from longserve.llm import LLM
from longserve.server.app import create_app
from longserve.server.background import BackgroundServer
from longserve.server.kv_plan import parse_kv_memory, plan_kv

QUESTION = "\n\nQuestion: summarise the three most important facts of this report in one sentence.\nAnswer:"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--clients", default="1,4,8,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--prompt-tokens", type=int, default=3072)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--policies", default="full,snapstream:512,snapstream:1024", help="name[:budget],...")
    p.add_argument(
        "--hf-requests", type=int, default=8, help="requests for the sequential HF baseline (0: skip)"
    )
    p.add_argument("--capacity-len", type=int, default=4096, help="sequence length for the capacity table")
    p.add_argument("--capacity-memory", default="2GiB")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights and KV for longserve and the HF baseline alike",
    )
    p.add_argument("--out", default="bench/results/serve_throughput", help="output path without extension")
    return p.parse_args(argv)


def policy_spec(text: str) -> tuple[str, int | None]:
    name, _, budget = text.partition(":")
    return name, int(budget) if budget else None


def build_prompts(tokenizer, n: int, prompt_tokens: int) -> list[list[int]]:
    """`n` distinct prompts of exactly `prompt_tokens` tokens: the document's paragraphs rotated by the
    request index (repeated as needed), cut to length, then a question."""
    paragraphs = [
        p for p in files("longserve").joinpath("data/demo_document.md").read_text().split("\n\n") if p
    ]
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    body_len = prompt_tokens - len(question)
    prompts = []
    for i in range(n):
        ids = tokenizer.encode(f"Request {i}.\n\n", add_special_tokens=True)
        k = i % len(paragraphs)
        while len(ids) < body_len:
            for para in paragraphs[k:] + paragraphs[:k]:
                ids += tokenizer.encode(para + "\n\n", add_special_tokens=False)
        prompts.append(ids[:body_len] + question)
    return prompts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _one_request(client: openai.OpenAI, model: str, prompt: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    first, usage = None, None
    for chunk in client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        if chunk.choices and first is None:
            first = time.perf_counter()
        usage = chunk.usage or usage
    end = time.perf_counter()
    return {"ttft_s": first - start, "e2e_s": end - start, "completion_tokens": usage.completion_tokens}


def run_clients(url: str, model: str, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = list(pool.map(lambda p: _one_request(client, model, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    ttfts = [r["ttft_s"] for r in rows]
    tokens = sum(r["completion_tokens"] for r in rows)
    return {
        "clients": clients,
        "requests": len(rows),
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "e2e_p50_s": statistics.median(r["e2e_s"] for r in rows),
    }


def bench_server(llm: LLM, spec: str, prompts: list[list[int]], levels: list[int], args) -> list[dict]:
    name, budget = policy_spec(spec)
    app = create_app(
        llm,
        kv_policy=llm.policy(name, budget),
        max_model_len=args.prompt_tokens + args.max_tokens,
        max_batch_size=max(levels),
        max_waiting=None,
    )
    plan = app.state.server.plan
    rows = []
    with BackgroundServer(app) as server:
        model = app.state.server.model_id
        run_clients(server.url, model, prompts[:1], 1, 2)  # warm-up: first-call costs are not throughput
        for clients in levels:
            row = run_clients(server.url, model, prompts, clients, args.max_tokens)
            rows.append({"engine": "longserve", "policy": spec, "slot_bytes": plan.slot_bytes, **row})
            print(
                f"  {spec:>16} x{clients:<3} {row['output_tok_s']:8.1f} tok/s  TTFT p50 {row['ttft_p50_s']:.2f} s"
                f"  p95 {row['ttft_p95_s']:.2f} s",
                file=sys.stderr,
            )
    return rows


def hf_baseline(llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict:
    """Sequential `generate` (greedy, exactly max_tokens new tokens); TTFT from a streamer's first token."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value) -> None:  # the first call carries the prompt, the second the first token
            self.calls += 1
            if self.calls == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    model = AutoModelForCausalLM.from_pretrained(llm.loaded.path, dtype=llm.dtype).eval()
    ids = torch.tensor([prompts[0][:16]])
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)  # warm-up
    ttfts, tokens = [], 0
    start = time.perf_counter()
    for prompt in prompts:
        ids, streamer = torch.tensor([prompt]), FirstToken()
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            streamer=streamer,
        )
        ttfts.append(streamer.at - t0)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start
    print(
        f"  {'hf generate':>16} x1   {tokens / wall:8.1f} tok/s  TTFT p50 {percentile(ttfts, 50):.2f} s",
        file=sys.stderr,
    )
    return {
        "engine": "transformers.generate (sequential)",
        "policy": "full",
        "clients": 1,
        "requests": len(prompts),
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
    }


def capacity(llm: LLM, specs: list[str], seq_len: int, memory: str) -> list[dict]:
    """Sequences of `seq_len` tokens per `memory` of K/V under each policy; the count is confirmed by
    building that pool (tensors allocated, never touched) and checking one more slot would not fit."""
    limit = parse_kv_memory(memory).amount
    rows = []
    for spec in specs:
        name, budget = policy_spec(spec)
        plan = plan_kv(
            llm, llm.policy(name, budget), max_model_len=seq_len, max_batch_size=10**9, max_kv_memory=memory
        )
        n = plan.sequences_by_memory
        pool = KVPool(llm.loaded.args, n, plan.slot_capacity, max_tokens=llm.context_window, dtype=llm.dtype)
        assert pool.nbytes() == n * plan.slot_bytes <= limit < (n + 1) * plan.slot_bytes
        rows.append(
            {
                "policy": spec,
                "seq_len": seq_len,
                "memory": memory,
                "slot_tokens": plan.slot_capacity,
                "slot_bytes": plan.slot_bytes,
                "sequences": n,
                "pool_bytes": pool.nbytes(),
                "vs_full": plan.capacity_ratio,
            }
        )
        del pool
    return rows


def markdown(result: dict) -> str:
    hf = next((r for r in result["throughput"] if r["engine"] != "longserve"), None)
    lines = [
        "# Serving throughput",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Model `{result['model']}`, prompts of {result['prompt_tokens']} tokens, {result['max_tokens']} output "
        f"tokens each (ignore_eos), {result['machine']}.",
        "",
        "| engine | policy | clients | requests | output tok/s | vs HF | TTFT p50 (s) | TTFT p95 (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["throughput"]:
        ratio = f"{r['output_tok_s'] / hf['output_tok_s']:.2f}x" if hf else "-"
        lines.append(
            f"| {r['engine']} | {r['policy']} | {r['clients']} | {r['requests']} | {r['output_tok_s']:.1f} "
            f"| {ratio} | {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} |"
        )
    lines += [
        "",
        f"## Capacity: concurrent {result['capacity'][0]['seq_len']}-token sequences in "
        f"{result['capacity'][0]['memory']} of KV",
        "",
        "| policy | tokens per slot | bytes per slot | sequences | vs full |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in result["capacity"]:
        lines.append(
            f"| {c['policy']} | {c['slot_tokens']} | {c['slot_bytes']:,} | {c['sequences']} "
            f"| {c['vs_full']:.1f}x |"
        )
    lines += [
        "",
        "Clients, server and engine share one process (in-process uvicorn); TTFT is measured by the "
        "client and includes queueing. The capacity counts K/V bytes; each pool was built to confirm it.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.clients.split(",")]
    specs = args.policies.split(",")
    llm = LLM(args.model, dtype=args.dtype, max_batch_size=max(levels), progress=False)
    prompts = build_prompts(llm.tokenizer, args.requests, args.prompt_tokens)
    throughput = []
    for spec in specs:
        throughput += bench_server(llm, spec, prompts, levels, args)
    if args.hf_requests:
        throughput.append(hf_baseline(llm, prompts[: args.hf_requests], args.max_tokens))
    result = {
        "command": command(),
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {args.dtype}",
        "throughput": throughput,
        "capacity": capacity(llm, specs, args.capacity_len, args.capacity_memory),
    }
    write_result(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
