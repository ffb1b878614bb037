"""Composition of experts: switch times per weight tier vs a cold process start, a trace under a budget
that holds two of three models, memory (peak RSS, what is not weights), and router accuracy on a labelled
prompt set written for this bench.

    python bench/coe_bench.py --requests 12 --skewed 20

The experts (models, descriptions and the router's labelled examples) are `bench/coe_experts.toml`. The
router's test prompts (PROMPTS below, 20 per expert) are a separate set: no example is drawn from them,
and the router's settings were chosen by leave-one-out on the examples alone (reported here too).
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

from longserve.coe import CoE, Expert, Router, load_experts  # noqa: E402
from longserve.coe.memory import mapped_rss_bytes, rss_bytes  # noqa: E402
from longserve.coe.router import HiddenStateEmbedder  # noqa: E402

EXPERTS_FILE = Path(__file__).parent / "coe_experts.toml"

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


def run_trace(coe: CoE, names: list[str], max_new: int, memory: list[dict]) -> dict:
    """Serve ``names`` in order; after every request note RSS and the resident weight bytes."""
    start = time.perf_counter()
    for name in names:
        begin = time.perf_counter()
        out = coe.generate(PROMPTS[name][0], model=name, max_new_tokens=max_new)
        memory.append(
            {
                "expert": name,
                "seconds": time.perf_counter() - begin,  # switch + prefill + decode
                "switch_s": out.stats["switch_s"],
                "rss": rss_bytes(),
                "mapped_weights_rss": mapped_rss_bytes(),  # the resident experts' weight pages touched
                "weight_bytes": coe.tiers.resident_bytes,  # what the budget counts
                "resident": list(coe.tiers.resident),
            }
        )
    return {"requests": len(names), "seconds": time.perf_counter() - start}


def route_all(router: Router) -> dict[str, list[str]]:
    return {name: [router.route(p).expert for p in prompts] for name, prompts in PROMPTS.items()}


def leave_one_out(experts: list[Expert], embed) -> tuple[int, int]:
    """Each example routed by a router that has every other example (and the descriptions)."""
    correct = total = 0
    for e in experts:
        for i, text in enumerate(e.examples):
            held = [
                Expert(
                    x.name,
                    x.model,
                    x.description,
                    [t for j, t in enumerate(x.examples) if x is not e or j != i],
                )
                for x in experts
            ]
            correct += Router(held, embed).route(text).expert == e.name
            total += 1
    return correct, total


def router_result(experts: list[Expert], embed) -> dict:
    bare = [Expert(e.name, e.model, e.description) for e in experts]
    out = {}
    for label, variant in (("descriptions only", bare), ("descriptions + examples", experts)):
        routed = route_all(Router(variant, embed))
        out[label] = {
            "correct": sum(r == name for name, rs in routed.items() for r in rs),
            "n": sum(len(rs) for rs in routed.values()),
            "confusion": {name: {e.name: rs.count(e.name) for e in experts} for name, rs in routed.items()},
        }
    out["examples leave-one-out"] = dict(zip(("correct", "n"), leave_one_out(experts, embed), strict=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12, help="alternating trace length")
    ap.add_argument("--skewed", type=int, default=20, help="80/20 trace length")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cold-starts", type=int, default=2, help="cold process starts measured per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--router-only", action="store_true", help="only the router accuracy (no switches)")
    ap.add_argument("--note", default="", help="a line for the markdown (e.g. the machine's load)")
    ap.add_argument("--out", default="bench/results/coe_bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    experts = load_experts(EXPERTS_FILE)
    for e in experts:
        e.dtype = args.dtype
    baseline_rss = rss_bytes()  # python + torch + longserve imported, no model yet
    coe = CoE(experts, "64GiB", router="chat")
    if args.router_only:
        routers = router_result(experts, HiddenStateEmbedder(lambda: coe.tiers.get("chat")))
        for label, r in routers.items():
            print(label, f"{r['correct']}/{r['n']}", r.get("confusion", ""))
        return
    # first loads (tier 2), one at a time so at most two models are ever resident: each one's weight bytes
    coe.tiers.get("chat")
    for name in ("code", "complete"):
        coe.tiers.get(name)
        coe.tiers.park(name)
    coe.tiers.get("chat").generate("Hello", max_new_tokens=2)  # every page of the router model touched
    # chat resident, the others parked (their memory left the process): what RSS holds besides weights
    after_parks = {"rss": rss_bytes(), "mapped_weights_rss": mapped_rss_bytes()}
    sizes = dict(coe.tiers.sizes)
    budget = sizes["chat"] + max(sizes["code"], sizes["complete"])  # two fit, three do not
    coe.tiers.max_weight_bytes = budget
    alternating = [["code", "complete", "chat"][i % 3] for i in range(args.requests)]
    rng = random.Random(0)
    skewed = [rng.choices(["code", "complete"], weights=[0.8, 0.2])[0] for _ in range(args.skewed)]
    memory: list[dict] = []
    traces = {"alternating": run_trace(coe, alternating, args.max_new_tokens, memory)}
    traces["skewed 80/20"] = run_trace(coe, skewed, args.max_new_tokens, memory)
    switches = coe.tiers.switches
    by_tier = {t: [s.seconds for s in switches if s.from_tier == t] for t in (1, 2)}
    code_t1 = [s.seconds for s in switches if s.from_tier == 1 and s.expert == "code"]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    routers = router_result(experts, HiddenStateEmbedder(lambda: coe.tiers.get("chat")))
    cold = {e.model: [cold_start(e.model, args.dtype) for _ in range(args.cold_starts)] for e in experts[1:]}
    non_weight = [m["rss"] - m["mapped_weights_rss"] for m in memory]
    result = {
        "command": command(),
        "machine": machine(),
        "note": args.note,
        "weight_bytes": sizes,
        "budget_bytes": budget,
        "switches": [vars(s) for s in switches],
        "switch_p50_s": {t: statistics.median(v) if v else None for t, v in by_tier.items()},
        "switch_p95_s": {t: percentile(v, 0.95) for t, v in by_tier.items()},
        "code_tier1_p50_s": statistics.median(code_t1) if code_t1 else None,
        "code_tier1_p95_s": percentile(code_t1, 0.95),
        "cold_start_s": cold,
        "traces": traces,
        "baseline_rss_bytes": baseline_rss,
        "chat_resident_others_parked": after_parks,
        "memory_after_each_request": memory,
        "non_weight_rss_bytes": {"min": min(non_weight), "max": max(non_weight)},
        "peak_rss_bytes": peak_rss,
        "oom": False,  # the process would not be here to write this otherwise
        "router": routers,
    }
    cold_code = statistics.median(cold["qwen2.5-coder-0.5b-instruct"])
    restart_total = sum(
        statistics.median(cold[next(e.model for e in experts if e.name == s.expert)])
        for s in switches
        if s.expert != "chat"
    )
    result["restart_on_demand_switch_s"] = restart_total
    write_result(args.out, result, markdown(result, args, experts, cold_code))


def markdown(result: dict, args, experts: list[Expert], cold_code: float) -> str:
    mib = 2**20
    sizes, budget, switches = result["weight_bytes"], result["budget_bytes"], result["switches"]
    n_tier = {t: sum(s["from_tier"] == t for s in switches) for t in (1, 2)}
    p50, p95 = result["switch_p50_s"], result["switch_p95_s"]
    code_t1 = result["code_tier1_p50_s"]
    peak, nw = result["peak_rss_bytes"], result["non_weight_rss_bytes"]
    parked = result["chat_resident_others_parked"]
    base = parked["rss"] - parked["mapped_weights_rss"]
    max_mapped = max(m["mapped_weights_rss"] for m in result["memory_after_each_request"])
    md = [
        "# Composition of experts",
        "",
        f"`{result['command']}`  ",
        f"{result['machine']}; weights {args.dtype}: "
        + ", ".join(f"{k} {v / mib:.0f} MiB" for k, v in sizes.items())
        + f"; budget {budget / mib:.0f} MiB (two of three fit).  ",
        result["note"],
        "",
        "| switch | n | p50 | p95 |",
        "|---|---:|---:|---:|",
        f"| from tier 1 (parked: flat file mapped back) | {n_tier[1]} | {fmt(p50[1], '.3f')} s | {fmt(p95[1], '.3f')} s |",
        f"| from tier 1, Qwen2.5-Coder-0.5B only | | {fmt(code_t1, '.3f')} s | {fmt(result['code_tier1_p95_s'], '.3f')} s |",
        f"| from tier 2 (checkpoint: read, cast, fuse, write flat file) | {n_tier[2]} | {fmt(p50[2], '.2f')} s | "
        f"{fmt(p95[2], '.2f')} s |",
        f"| cold process start + load + first token, Qwen-0.5B (n={args.cold_starts}) | | {cold_code:.2f} s | |",
        "",
    ]
    if code_t1:
        md.append(
            f"Qwen2.5-Coder-0.5B tier-1 switch p50 {code_t1:.3f} s: {cold_code / code_t1:.0f}x faster than a cold start."
        )
    md += [
        "",
        "| trace | requests | total time |",
        "|---|---:|---:|",
    ]
    md += [f"| {name} | {t['requests']} | {t['seconds']:.1f} s |" for name, t in result["traces"].items()]
    md += [
        "",
        f"All {len(switches)} switches took {sum(s['seconds'] for s in switches):.1f} s; as process restarts "
        f"(one server per model restarted on demand: a cold start per switch) they would take "
        f"{result['restart_on_demand_switch_s']:.1f} s. Zero OOM.",
        "",
        "Memory (RSS = anonymous + mapped file pages of this process; the experts' weights are mapped "
        "flat files, so their resident pages are measured apart from everything else, from /proc/self/smaps):",
        "",
        f"- peak RSS {peak / mib:.0f} MiB over the whole run, first loads included; the target, budget + 10% + the "
        f"runtime baseline below: {budget / mib:.0f} x 1.1 + {base / mib:.0f} = {(1.1 * budget + base) / mib:.0f} MiB "
        f"({'met' if peak <= 1.1 * budget + base else 'missed'});",
        f"- runtime baseline = RSS besides weights with only the pinned router model resident, the other two "
        f"parked: {base / mib:.0f} MiB, of which {result['baseline_rss_bytes'] / mib:.0f} MiB is python + torch + "
        f"longserve before any model, the rest the three tokenizers and configs kept across parks (a re-read "
        "costs 1.5-6 s; Gemma's 262k-token tokenizer alone holds about 260 MiB) and allocator slack;",
        f"- RSS besides weights after each trace request: {nw['min'] / mib:.0f}-{nw['max'] / mib:.0f} MiB "
        "(the baseline plus the router's embedding cache and per-request KV / activations);",
        f"- mapped weight pages resident at most {max_mapped / mib:.0f} MiB (<= the budget: the budget counts "
        "bytes of tensors, RSS only the pages touched; a parked expert's pages leave the process and stay "
        "in the page cache).",
        "",
    ]
    for label in ("descriptions only", "descriptions + examples"):
        r = result["router"][label]
        md += [
            f"Router, {label} (SmolLM2 hidden states at 70% depth, centered, per-expert 3-NN): "
            f"{r['correct']}/{r['n']} = {r['correct'] / r['n']:.0%} of the test prompts.",
            "",
            "| prompt class | " + " | ".join(e.name for e in experts) + " |",
            "|---|" + "---:|" * len(experts),
        ]
        md += [
            f"| {name} | " + " | ".join(str(row[e.name]) for e in experts) + " |"
            for name, row in r["confusion"].items()
        ]
        md.append("")
    loo = result["router"]["examples leave-one-out"]
    md.append(
        f"Examples (`bench/coe_experts.toml`, {loo['n']}, written apart from the {r['n']} test prompts) routed "
        f"leave-one-out: {loo['correct']}/{loo['n']} (how the router's settings were chosen)."
    )
    return "\n".join(md)


if __name__ == "__main__":
    main()
