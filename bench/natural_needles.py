"""Accuracy vs kept fraction on the natural-text needle suite (`longserve.eval.natural`): needles in
real prose, chat template, query-aware and query-agnostic ("compress once, ask many"), with kvpress
on the same token ids when its venv is given.

Sharing keeps the CPU cost down without changing any cell's result: per sample the context (minus a
tail) is prefilled once into a staging slot; the tail (plus the question, query-aware) runs once and
every policy selects from it into its own slot (`kv_accuracy.FanOut`). KVzip cells run their
reconstruction pass once per sample and setting on the staged prompt (all but its last token, as the
engine does), then the last token selects for every ratio with the same scores. Query-agnostic
contexts answer each of a sample's questions (multi-key: four) from one compressed context.

    python bench/natural_needles.py --samples 8 --ratios 0.5,0.25,0.125
    python bench/natural_needles.py --report-only   # tables + plot from the JSONL
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from common import command, machine, write_result
from kv_accuracy import FanOut, prefill_staging

from longserve import LLM
from longserve.context import CompressedContext
from longserve.engine.sampler import SamplingParams
from longserve.eval.suite import make_suite
from longserve.kv.attention import PrefillBackend
from longserve.kv.cache import KVPool
from longserve.kv.policies import FullPolicy, make_policy
from longserve.kv.scoring_pass import run_scoring_pass

TAIL = 48  # context tokens of the final chunk: SnapKV's 32-query window fits in it


def policy_for(method: str, ratio: float):
    """`kvzip`, `kvzip+ada` (head-level budgets, no floor), `kvzip+global` / `snapkv+pyramid`
    (per-layer budgets), `kvzip+ada+global` (one threshold over all layers and heads, as kvpress)."""
    base, *flags = method.split("+")
    extra = {"head_adaptive": True, "head_floor": 0.0} if "ada" in flags else {}
    for schedule in ("global", "pyramid"):
        if schedule in flags:
            extra["layer_budgets"] = schedule
    for flag in flags:  # `cap8`: a layer keeps at most 8x the uniform budget (default 3)
        if flag.startswith("cap"):
            extra["layer_cap"] = float(flag[3:])
    return make_policy(base, ratio=ratio, **extra)


def final_chunk(llm, engine, seqs, ids, staged, n_staged, pass_scores=None):
    """The slots of `seqs` (one policy each) from one forward pass of ids[n_staged:] over the staged
    prefix; returns the last position's logits."""
    model = llm.loaded.model
    positions = torch.arange(n_staged, len(ids))
    inv_freq = [model.layer_inv_freq(layer) for layer in range(llm.loaded.args.n_layers)]
    backends = [
        PrefillBackend(
            engine.pool, s.slot, positions, staging=staged, pass_scores=pass_scores, inv_freq=inv_freq
        )
        for s in seqs
    ]
    with torch.inference_mode():
        logits = model(torch.tensor([ids[n_staged:]]), positions[None], FanOut(backends, staged, positions))
    for backend, seq in zip(backends, seqs, strict=True):
        backend.finish()
        seq.prefilled = len(ids)
        engine.runner.record(seq)
    return logits


def kvzip_staging(llm, ids, staged, n_staged):
    """The staged prefix extended to ids[:-1] and the reconstruction scores of those entries."""
    ctx = CompressedContext.from_slot(staged[0], staged[1], "", {}, n_staged)
    pool = KVPool(llm.loaded.args, 1, len(ids), dtype=llm.dtype)
    slot = pool.allocate(FullPolicy())
    ctx.load_into(pool, slot)
    positions = torch.arange(n_staged, len(ids) - 1)
    backend = PrefillBackend(pool, slot, positions, final=False)
    with torch.inference_mode():
        llm.loaded.model(torch.tensor([ids[n_staged:-1]]), positions[None], backend)
    backend.finish()
    chunks = make_policy("kvzip", ratio=0.5).scoring_pass(ids[:-1], llm.tokenizer)
    started = time.perf_counter()
    scores = run_scoring_pass(llm.loaded.model, (pool, slot), (pool, slot), chunks, len(ids) - 1)
    seconds = time.perf_counter() - started
    padded = [None if s is None else torch.nn.functional.pad(s, (0, 1), value=float("inf")) for s in scores]
    return (pool, slot), padded, seconds


def decode_aware(engine, seqs, logits):
    engine.emit(seqs, logits)
    while engine.has_unfinished():
        engine.step()
    return [(s.text, s.stats()["kv_bytes_final"]) for s in seqs]


def ask_agnostic(llm, engine, seqs, policies, n_ctx, questions, max_new):
    """Each compressed context answers every question (one stored context, many questions); all
    contexts decode as one batch per question."""
    contexts = [
        CompressedContext.from_slot(engine.pool, s.slot, llm.fingerprint, p.describe(), n_ctx)
        for s, p in zip(seqs, policies, strict=True)
    ]
    out = []
    params = SamplingParams(max_new_tokens=max_new)
    for q_ids in questions:
        asking = llm.engine(len(contexts), max(c.fill for c in contexts) + len(q_ids) + max_new)
        asked = [asking.add_request(q_ids, params, FullPolicy(), prefix=c) for c in contexts]
        while asking.has_unfinished():
            asking.step()
        out.append([(s.text, c.nbytes) for s, c in zip(asked, contexts, strict=True)])
    return out  # [question][policy]


def run_sample(llm, sample, cells, settings, max_new, sink, meta):
    questions = sample.metadata.get("questions") or [{"question": sample.question, "answers": sample.answers}]
    ctx_ids, _ = llm.split_chat(sample.context, questions[0]["question"], sep="")
    q_tails = [llm.split_chat(sample.context, q["question"], sep="")[1] for q in questions]
    n_staged = len(ctx_ids) - TAIL
    staged = prefill_staging(llm, ctx_ids[:n_staged])
    ids_by_setting = {"query_aware": ctx_ids + q_tails[0], "query_agnostic": ctx_ids}
    rows = []
    for setting in settings:
        if setting == "query_aware" and len(questions) > 1:
            continue  # multi-key is the compress-once-ask-many setting
        ids = ids_by_setting[setting]
        policies = [FullPolicy() if m == "full" else policy_for(m, r) for m, r in cells]
        params = SamplingParams(max_new_tokens=max_new)
        engine = llm.engine(len(policies), max(p.capacity(len(ids), max_new) for p in policies))
        seqs = [engine.add_request(ids, params, p) for p in policies]
        engine.scheduler.admit()
        zipped = [i for i, (m, _) in enumerate(cells) if m.startswith("kvzip")]
        others = [i for i in range(len(cells)) if i not in zipped]
        logits = torch.zeros(len(cells), llm.loaded.args.vocab_size)
        pass_s = None
        for group in (others, zipped):  # one final chunk per group, then one decode batch for all
            if not group:
                continue
            if group is zipped:
                src, scores, pass_s = kvzip_staging(llm, ids, staged, n_staged)
                got = final_chunk(llm, engine, [seqs[i] for i in group], ids, src, len(ids) - 1, scores)
            else:
                got = final_chunk(llm, engine, [seqs[i] for i in group], ids, staged, n_staged)
            logits[group] = got.expand(len(group), -1)
        if setting == "query_aware":
            results = [decode_aware(engine, seqs, logits)]
        else:
            results = ask_agnostic(llm, engine, seqs, policies, len(ctx_ids), q_tails, max_new)
        for j, per_policy in enumerate(results):
            for (method, ratio), (text, kv_bytes) in zip(cells, per_policy, strict=True):
                answers = questions[j]["answers"]
                rows.append(
                    {
                        **meta,
                        "sample": sample.id,
                        "question": j,
                        "setting": setting,
                        "method": method,
                        "ratio": ratio,
                        "library": "longserve",
                        "context_tokens": len(ctx_ids),
                        "depth": questions[j].get("depth", sample.depth),
                        "prediction": text,
                        "correct": all(a in text for a in answers),
                        "kv_bytes": kv_bytes,
                        "scoring_pass_s": pass_s if method.startswith("kvzip") else None,
                        "load1": os.getloadavg()[0],
                        "command": command(),
                    }
                )
    for row in rows:
        sink.write(json.dumps(row) + "\n")
    sink.flush()
    return ctx_ids, q_tails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default="natural_single,natural_multikey")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--ratios", default="0.5,0.25,0.125")
    ap.add_argument("--methods", default="snapkv,kvzip,kvzip+ada,expected_attention,knorm")
    ap.add_argument("--settings", default="query_aware,query_agnostic")
    ap.add_argument("--max-new-tokens", type=int, default=28)
    ap.add_argument("--kvpress-python", help="python of a venv with kvpress: run its presses on the same ids")
    ap.add_argument("--out", default="bench/results/natural_needles")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    if not args.report_only:
        llm = LLM(args.model, progress=False)
        count = lambda text: len(llm.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        ratios = [float(r) for r in args.ratios.split(",")]
        cells = [("full", 1.0)] + [(m, r) for m in args.methods.split(",") for r in ratios]
        settings = args.settings.split(",")
        samples = make_suite(args.tasks.split(","), args.samples, args.length, count, seed=0)
        meta = {"model": args.model, "length": args.length}
        # resumable per (sample, setting): a later run may add the other setting of the same samples
        done = (
            {
                (r["sample"], r["setting"])
                for r in map(json.loads, jsonl.open())
                if r["library"] == "longserve"
            }
            if jsonl.exists()
            else set()
        )
        ids_file = out.with_name(out.name + "_ids.jsonl")
        have_ids = {json.loads(line)["sample"] for line in ids_file.open()} if ids_file.exists() else set()
        out.parent.mkdir(parents=True, exist_ok=True)
        with jsonl.open("a") as sink, ids_file.open("a") as ids_sink:
            for sample in samples:
                todo = [s for s in settings if (sample.id, s) not in done]
                if not todo:
                    continue
                started = time.perf_counter()
                ctx_ids, q_tails = run_sample(llm, sample, cells, todo, args.max_new_tokens, sink, meta)
                answers = [q["answers"] for q in sample.metadata.get("questions", [])] or [sample.answers]
                if sample.id not in have_ids:
                    ids_sink.write(
                        json.dumps(
                            {
                                "sample": sample.id,
                                "context": ctx_ids,
                                "questions": q_tails,
                                "answers": answers,
                            }
                        )
                        + "\n"
                    )
                    ids_sink.flush()
                print(f"{sample.id}: {time.perf_counter() - started:.0f}s", flush=True)
        if args.kvpress_python:
            subprocess.run(
                [
                    args.kvpress_python,
                    "bench/natural_needles_kvpress.py",
                    "--ids",
                    str(ids_file),
                    "--out",
                    str(jsonl),
                    "--model",
                    args.model,
                    "--ratios",
                    args.ratios,
                ],
                check=True,
            )
    report(out, jsonl, command())


#: The kvpress press each longserve method is the same selection as: kvpress's KVzip prunes by one
#: threshold over all layers and heads, its `layerwise=True` by one threshold per layer.
KVPRESS_EQUIVALENT = {"kvzip+ada+global": "kvzip", "kvzip+ada": "kvzip_layerwise", "kvzip": "kvzip_uniform"}


def targets(summary: list[dict]) -> list[str]:
    """The issue's targets, stated per cell: query-agnostic kvzip as a share of the same library's full
    cache at 4x and 8x, and each longserve cell against kvpress's cell of the same method."""
    by = {(s["task"], s["setting"], s["library"], s["method"], s["ratio"]): s for s in summary}
    lines = ["## Targets", ""]
    for (tsk, setting, lib, method, ratio), s in sorted(by.items(), key=lambda kv: tuple(map(str, kv[0]))):
        full = by.get((tsk, setting, lib, "full", 1.0))
        if method.startswith("kvzip") and setting == "query_agnostic" and ratio in (0.25, 0.125) and full:
            goal = 0.95 if ratio == 0.25 else 0.90
            share = s["accuracy"] / full["accuracy"] if full["accuracy"] else float("nan")
            verdict = "met" if share >= goal else "missed"
            lines.append(
                f"- {tsk}, {lib} {method} keep {ratio:g}: {s['correct']}/{s['n']} vs full {full['correct']}/"
                f"{full['n']} = {share:.0%} of full (target {goal:.0%}): {verdict}"
            )
    for (tsk, setting, lib, method, ratio), s in sorted(by.items(), key=lambda kv: tuple(map(str, kv[0]))):
        press = KVPRESS_EQUIVALENT.get(method, method)
        other = by.get((tsk, setting, "kvpress", press, ratio))
        if lib != "longserve" or other is None or method == "full":
            continue
        sign = ">=" if s["accuracy"] >= other["accuracy"] else "<"
        lines.append(
            f"- {tsk}, {setting}, {method} keep {ratio:g}: longserve {s['correct']}/{s['n']} {sign} kvpress "
            f"{press} {other['correct']}/{other['n']}"
        )
    return lines + [""] if len(lines) > 2 else []


def report(out: Path, jsonl: Path, cmd: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.open()]
    task = lambda r: r["sample"].split("/")[0]  # noqa: E731
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((task(r), r["setting"], r["library"], r["method"], r["ratio"]), []).append(r)
    summary = [
        {
            "task": k[0],
            "setting": k[1],
            "library": k[2],
            "method": k[3],
            "ratio": k[4],
            "n": len(v),
            "correct": sum(r["correct"] for r in v),
            "accuracy": sum(r["correct"] for r in v) / len(v),
            "kv_mib": sum(r["kv_bytes"] for r in v) / len(v) / 2**20,
        }
        for k, v in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))
    ]
    model = rows[0]["model"] if rows else "?"
    length = rows[0]["length"] if rows else "?"
    meta = {
        "command": cmd,
        "model": model,
        "length": length,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    ratios = sorted({s["ratio"] for s in summary if s["method"] != "full"}, reverse=True)
    loads = [r["load1"] for r in rows if r.get("load1") is not None]
    load_line = (
        f"Load average (1 min) while rows were written: {min(loads):.1f}-{max(loads):.1f}." if loads else ""
    )
    lines = [
        f"# Natural-text needles: accuracy vs kept fraction, {model}, {length}-token contexts",
        "",
        f"Command: `{cmd}` ({meta['date']}; {meta['machine']}; 2 CPU cores shared with other jobs, so no",
        "timings are compared here). Haystack: Python standard-library docstrings (`longserve.eval.natural`),",
        "chat template, greedy answers; correct = every expected value in the answer. Cells: correct/n.",
        "Query-agnostic: the context is compressed before the question; multi-key asks 4 questions of one",
        "compressed context (n counts questions). `+ada` = head-level budgets (AdaKV wrapper, no floor).",
        load_line,
        "",
        "Runs that wrote the rows:",
        "",
        *[f"- `{c}`" for c in sorted({r["command"] for r in rows if r.get("command")})],
        "",
    ]
    for tsk in sorted({s["task"] for s in summary}):
        for setting in ("query_aware", "query_agnostic"):
            cell = [s for s in summary if s["task"] == tsk and s["setting"] == setting]
            if not cell:
                continue
            full = [s for s in cell if s["method"] == "full"]
            head = f"## {tsk}, {setting}"
            if full:
                head += (
                    " (full cache: "
                    + ", ".join(f"{f['library']} {f['correct']}/{f['n']}" for f in full)
                    + ")"
                )
            lines += [
                head,
                "",
                "| library | method | " + " | ".join(f"keep {r:g}" for r in ratios) + " |",
                "|---|---|" + "---|" * len(ratios),
            ]
            for lib, method in sorted({(s["library"], s["method"]) for s in cell if s["method"] != "full"}):
                vals = {s["ratio"]: s for s in cell if s["library"] == lib and s["method"] == method}
                lines.append(
                    f"| {lib} | {method} | "
                    + " | ".join(f"{vals[r]['correct']}/{vals[r]['n']}" if r in vals else "-" for r in ratios)
                    + " |"
                )
            lines.append("")
    lines += targets(summary)
    write_result(out, {"meta": meta, "summary": summary}, "\n".join(lines))
    panels = sorted({(s["task"], s["setting"]) for s in summary})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (tsk, setting) in zip(axes[0], panels, strict=True):
        cell = [s for s in summary if s["task"] == tsk and s["setting"] == setting]
        for lib, method in sorted({(s["library"], s["method"]) for s in cell if s["method"] != "full"}):
            pts = sorted(
                (s["ratio"], s["accuracy"]) for s in cell if (s["library"], s["method"]) == (lib, method)
            )
            style = "-" if lib == "longserve" else ":"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{lib} {method}")
        for f in (s for s in cell if s["method"] == "full" and s["library"] == "longserve"):
            ax.axhline(f["accuracy"], color="black", linestyle="--", label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{tsk}, {setting}")
        ax.set_xlabel("kept fraction of the prompt")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
