"""Greedy agreement of bf16 / int8 / int4 with fp32 on the integration tests' prompts (SmolLM2).

bf16 rounds every matmul to 8 significant bits, so at a near-tie greedy decoding can pick another token
and the continuation diverges from there. This counts, per weights/dtype setting, how many prompts give
token-identical output to fp32, how many tokens match before the first difference, and whether the
answer the integration tests check (Paris, 4, the pass key) is still there.

    python bench/dtype_agreement.py --weights fp32,bf16,int8,int4
"""

from __future__ import annotations

import argparse
import random
import time

from common import command, machine, write_result

from longserve import LLM
from longserve.eval.synthetic import filler_passkey_prompt


def prompts() -> list[dict]:
    """(name, prompt, tokens, expected answer or None): the integration prompts plus two open ones."""
    chat = [
        ("capital", "What is the capital of France? Answer in one word.", 12, "Paris"),
        ("two-plus-two", "What is 2+2?", 24, "4"),
        ("haiku", "Write a haiku about the sea.", 32, None),
        ("hash-table", "Explain what a hash table is in two sentences.", 32, None),
    ]
    out = [
        {"name": n, "prompt": [{"role": "user", "content": c}], "tokens": t, "answer": a}
        for n, c, t, a in chat
    ]
    for i, depth in enumerate((0.25, 0.5, 0.75)):
        key = random.Random(i).randint(10000, 99999)
        out.append(
            {
                "name": f"passkey-1k-{depth}",
                "prompt": filler_passkey_prompt(key, 40, depth),
                "tokens": 8,
                "answer": str(key),
            }
        )
    out.append(
        {
            "name": "passkey-2k-0.5",
            "prompt": filler_passkey_prompt(60494, 80, 0.5),
            "tokens": 8,
            "answer": "60494",
        }
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--weights", default="fp32,bf16,int8,int4", help="the first one is the reference")
    ap.add_argument("--out", default="bench/results/dtype_agreement")
    args = ap.parse_args()
    cases = prompts()
    results: dict[str, list[dict]] = {}
    for weights in args.weights.split(","):
        llm = LLM(args.model, weights=weights, progress=False)
        rows = []
        for case in cases:
            start = time.perf_counter()
            out = llm.generate(case["prompt"], max_new_tokens=case["tokens"])[0]
            rows.append(
                {
                    "name": case["name"],
                    "token_ids": out.token_ids,
                    "text": out.text,
                    "right": None if case["answer"] is None else case["answer"] in out.text,
                    "seconds": time.perf_counter() - start,
                }
            )
            print(weights, case["name"], repr(out.text), flush=True)
        results[weights] = rows
        del llm
    ref_name = next(iter(results))
    summary = []
    for weights, rows in results.items():
        same, prefix, total, right, checked = 0, 0, 0, 0, 0
        for row, ref in zip(rows, results[ref_name], strict=True):
            a, b = row["token_ids"], ref["token_ids"]
            n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            same += a == b
            prefix += n
            total += len(b)
            if row["right"] is not None:
                checked += 1
                right += row["right"]
        summary.append(
            {
                "weights": weights,
                "identical": same,
                "prompts": len(rows),
                "prefix_tokens": prefix,
                "ref_tokens": total,
                "right": right,
                "checked": checked,
            }
        )
    lines = [
        f"# Greedy agreement with {ref_name}: {args.model}",
        "",
        f"Command: `{command()}` ({machine()}, {time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"{len(cases)} prompts: the integration tests' (capital, 2+2, three 1k pass keys, the 2k middle needle)"
        " and two open-ended chat prompts; greedy, `full` KV policy.",
        "",
        f"| weights | identical to {ref_name} | tokens before the first difference | right answers |",
        "|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['weights']} | {s['identical']}/{s['prompts']} | {s['prefix_tokens']}/{s['ref_tokens']} "
            f"({100 * s['prefix_tokens'] / max(1, s['ref_tokens']):.0f}%) | {s['right']}/{s['checked']} |"
        )
    lines += ["", "Outputs that differ from the reference:", ""]
    for weights, rows in results.items():
        for row, ref in zip(rows, results[ref_name], strict=True):
            if row["token_ids"] != ref["token_ids"]:
                lines.append(f"- {weights}, {row['name']}: {row['text']!r} (vs {ref['text']!r})")
    write_result(args.out, {"summary": summary, "results": results, "command": command()}, "\n".join(lines))


if __name__ == "__main__":
    main()
