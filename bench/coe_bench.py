"""Composition of experts: switch times per weight tier vs a cold process start, a trace under a budget
that holds two of three models, and router accuracy on a labelled prompt set written for this bench.

    python bench/coe_bench.py --requests 12 --skewed 20
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import command, fmt, machine, write_result  # noqa: E402

from longserve.coe import CoE, Expert  # noqa: E402

EXPERTS = [
    Expert(
        "chat",
        "smollm2-135m-instruct",
        "friendly general conversation, advice, questions about everyday life",
    ),
    Expert(
        "code",
        "qwen2.5-coder-0.5b-instruct",
        "programming, Python functions, bugs, SQL, shell commands, code",
    ),
    Expert("complete", "gemma-3-270m", "continue a text: the opening of a story, an article or a document"),
]

# written for this bench (not tuned on): 20 prompts per expert
PROMPTS = {
    "chat": [
        "How can I sleep better when I am stressed?",
        "What should I cook for dinner tonight with rice and eggs?",
        "Any tips for a first job interview?",
        "How do I politely decline a wedding invitation?",
        "What are good houseplants for a dark apartment?",
        "Can you suggest a weekend trip near the mountains?",
        "How often should I water a cactus?",
        "What is a nice gift for my grandmother's birthday?",
        "How do I stay motivated to exercise in winter?",
        "My friend is sad about her exam. What can I say?",
        "Is it better to rent or buy a bicycle for commuting?",
        "How do I make my tea less bitter?",
        "What games can children play on a rainy day?",
        "How can I learn to speak more confidently in meetings?",
        "Should I take a gap year before university?",
        "What's the best way to keep bread fresh?",
        "How do I start journaling every day?",
        "Recommend a relaxing evening routine.",
        "How can I save money on groceries?",
        "What do people usually say at a farewell party?",
    ],
    "code": [
        "Write a Python function that reverses a linked list.",
        "Why does my SQL query with GROUP BY return duplicate rows?",
        "Fix the bug: for i in range(len(xs)): if xs[i] = 0: print(i)",
        "How do I read a CSV file with pandas and drop empty rows?",
        "Write a bash one-liner that counts lines in all .py files.",
        "Explain the difference between a list and a tuple in Python.",
        "Implement binary search in JavaScript.",
        "My Rust program says 'borrowed value does not live long enough'. Why?",
        "Write a regular expression that matches an email address.",
        "How do I make an HTTP GET request with the requests library?",
        "Refactor this function to use a dictionary instead of if/elif chains.",
        "What does the git rebase command do?",
        "Write a unit test for a function add(a, b).",
        "How do I sort a list of dicts by the key 'age'?",
        "Convert this loop into a list comprehension: out = []; for x in xs: out.append(x * 2)",
        "Why is my recursive fibonacci so slow and how do I memoize it?",
        "Write a Dockerfile for a small Flask app.",
        "How do I handle exceptions when opening a file in Python?",
        "What is the time complexity of quicksort?",
        "Write a C function that swaps two integers through pointers.",
    ],
    "complete": [
        "Once upon a time, in a village at the edge of a great forest,",
        "The committee met on Tuesday to review the annual budget. After a long discussion,",
        "Chapter One. The rain had not stopped for three days when",
        "In 1869 the railway finally reached the western coast, and with it",
        "The old lighthouse keeper climbed the stairs every evening, and",
        "Abstract: We study the behaviour of migrating birds in",
        "Dear Sir or Madam, I am writing to inform you that",
        "The recipe has been in our family for generations. First, the flour",
        "It was the coldest winter anyone could remember. The river froze and",
        "Section 2. Terms and conditions. The tenant agrees to",
        "The museum's new exhibition opens with a room full of",
        "Breaking news: officials confirmed this morning that",
        "She opened the letter slowly, knowing that whatever it said",
        "The history of the city begins with a small market on the river, where",
        "Minutes of the meeting held on 4 March. Present:",
        "The expedition left the base camp at dawn. By noon the wind",
        "Product description: this handmade wooden chair is",
        "In the beginning there was only the sea, and the sea was",
        "The report concludes that the main causes of the delay were",
        "Our story starts in a small bookshop on a narrow street, where",
    ],
}


def cold_start(model: str, dtype: str) -> float:
    """A fresh process: import, load, first token (what restarting a one-model server costs)."""
    code = (
        "import time; t=time.perf_counter(); from longserve import LLM; "
        f"llm=LLM({model!r}, dtype={dtype!r}, progress=False); llm.generate('Hi', max_new_tokens=1); "
        "print(time.perf_counter()-t)"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_trace(coe: CoE, names: list[str], max_new: int) -> dict:
    start = time.perf_counter()
    for name in names:
        coe.generate(PROMPTS[name][0], model=name, max_new_tokens=max_new)
    return {"requests": len(names), "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12, help="alternating trace length")
    ap.add_argument("--skewed", type=int, default=20, help="80/20 trace length")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cold-starts", type=int, default=2, help="cold process starts measured per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/coe_bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for e in EXPERTS:
        e.dtype = args.dtype
    coe = CoE(EXPERTS, "64GiB", router="chat")
    for e in EXPERTS:  # first loads (tier 2) measure each model's weight bytes
        coe.tiers.get(e.name)
    sizes = dict(coe.tiers.sizes)
    budget = sizes["chat"] + max(sizes["code"], sizes["complete"])  # two fit, three do not
    coe.tiers.max_weight_bytes = budget
    for name in ("code", "complete"):
        coe.tiers.park(name)
    alternating = [["code", "complete", "chat"][i % 3] for i in range(args.requests)]
    rng = random.Random(0)
    skewed = [rng.choices(["code", "complete"], weights=[0.8, 0.2])[0] for _ in range(args.skewed)]
    traces = {"alternating": run_trace(coe, alternating, args.max_new_tokens)}
    traces["skewed 80/20"] = run_trace(coe, skewed, args.max_new_tokens)
    switches = coe.tiers.switches
    by_tier = {t: [s.seconds for s in switches if s.from_tier == t] for t in (1, 2)}
    code_t1 = [s.seconds for s in switches if s.from_tier == 1 and s.expert == "code"]
    cold = {e.model: [cold_start(e.model, args.dtype) for _ in range(args.cold_starts)] for e in EXPERTS[1:]}
    routed = {name: [coe.route(p).expert for p in prompts] for name, prompts in PROMPTS.items()}
    correct = sum(r == name for name, rs in routed.items() for r in rs)
    n_prompts = sum(len(p) for p in PROMPTS.values())
    confusion = {name: {e.name: rs.count(e.name) for e in EXPERTS} for name, rs in routed.items()}
    result = {
        "command": command(),
        "machine": machine(),
        "weight_bytes": sizes,
        "budget_bytes": budget,
        "switches": [vars(s) for s in switches],
        "switch_p50_s": {t: statistics.median(v) if v else None for t, v in by_tier.items()},
        "switch_p95_s": {t: percentile(v, 0.95) for t, v in by_tier.items()},
        "code_tier1_p50_s": statistics.median(code_t1) if code_t1 else None,
        "cold_start_s": cold,
        "traces": traces,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "router_accuracy": correct / n_prompts,
        "router_n": n_prompts,
        "router_confusion": confusion,
    }
    cold_code = statistics.median(cold["qwen2.5-coder-0.5b-instruct"])
    restart_total = sum(
        statistics.median(cold[next(e.model for e in EXPERTS if e.name == s.expert)])
        for s in switches
        if s.expert != "chat"
    )
    result["restart_on_demand_switch_s"] = restart_total
    mib = 2**20
    md = [
        "# Composition of experts",
        "",
        f"`{result['command']}`  ",
        f"{result['machine']}; weights {args.dtype}: "
        + ", ".join(f"{k} {v / mib:.0f} MiB" for k, v in sizes.items())
        + f"; budget {budget / mib:.0f} MiB (two of three fit)",
        "",
        "| switch | n | p50 | p95 |",
        "|---|---:|---:|---:|",
        f"| from tier 1 (parked) | {len(by_tier[1])} | {fmt(result['switch_p50_s'][1], '.2f')} s | "
        f"{fmt(result['switch_p95_s'][1], '.2f')} s |",
        f"| from tier 2 (disk) | {len(by_tier[2])} | {fmt(result['switch_p50_s'][2], '.2f')} s | "
        f"{fmt(result['switch_p95_s'][2], '.2f')} s |",
        f"| cold process start + load + first token, Qwen-0.5B (n={args.cold_starts}) | | {cold_code:.2f} s | |",
        "",
        f"Qwen2.5-Coder-0.5B tier-1 switch p50 {fmt(result['code_tier1_p50_s'], '.2f')} s: "
        f"{cold_code / result['code_tier1_p50_s']:.1f}x faster than a cold start."
        if result["code_tier1_p50_s"]
        else "",
        "",
        "| trace | requests | total time | switches as process restarts (sum of cold starts) |",
        "|---|---:|---:|---:|",
    ]
    for name, t in traces.items():
        md.append(f"| {name} | {t['requests']} | {t['seconds']:.1f} s | |")
    md += [
        f"| all switches | {len(switches)} | {sum(s.seconds for s in switches):.1f} s in switches | "
        f"{restart_total:.1f} s |",
        "",
        f"Peak RSS {result['peak_rss_bytes'] / mib:.0f} MiB (budget {budget / mib:.0f} MiB of weights + runtime).",
        "",
        f"Router (SmolLM2 hidden states, descriptions only, margin 0.02): {correct}/{n_prompts} "
        f"= {result['router_accuracy']:.0%} correct.",
        "",
        "| prompt class | " + " | ".join(e.name for e in EXPERTS) + " |",
        "|---|" + "---:|" * len(EXPERTS),
    ]
    md += [
        f"| {name} | " + " | ".join(str(row[e.name]) for e in EXPERTS) + " |"
        for name, row in confusion.items()
    ]
    write_result(args.out, result, "\n".join(md))


if __name__ == "__main__":
    main()
