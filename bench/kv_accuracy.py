"""Accuracy vs KV budget: every policy at several budgets on pass-key retrieval, query-aware and
query-agnostic, with a plot.

The prompt's first part is prefilled once per sample into an uncompressed staging slot; the final
prefill chunk (`--tail` tokens, which holds every query any policy votes with) runs once, every policy
selects from it into its own compressed slot (the engine's chunked-prefill path), and all cells of a
sample decode as one batch. Outputs equal running each cell alone. (H2O scores with the final chunk's
queries only in this mode.) Resumable: finished cells in the JSONL are skipped.

    python bench/kv_accuracy.py --lengths 2048,4096 --samples 50 --budgets 128,256,512,1024
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from common import command, write_result
from tqdm import tqdm

from longserve import LLM
from longserve.context import CompressedContext
from longserve.engine.sampler import SamplingParams
from longserve.kv.attention import PrefillBackend
from longserve.kv.cache import KVPool
from longserve.kv.policies import FullPolicy, make_policy

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_context(tokenizer, key: int, n_tokens: int, depth: float) -> str:
    per = len(tokenizer.encode(FILLER, add_special_tokens=False))
    n = max(1, (n_tokens - 60) // per)
    parts = [FILLER] * n
    parts.insert(int(n * depth), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    return (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n" + "".join(parts)
    )


def prefill_staging(llm: LLM, ids: list[int]) -> tuple[KVPool, int]:
    pool = KVPool(llm.loaded.args, 1, len(ids), dtype=llm.dtype)
    slot = pool.allocate(FullPolicy())
    backend = PrefillBackend(pool, slot, torch.arange(len(ids)), final=False)
    with torch.inference_mode():
        llm.loaded.model(torch.tensor([ids]), torch.arange(len(ids))[None], backend)
    backend.finish()
    return pool, slot


class FanOut:
    """The final chunk's forward pass is the same for every policy (its queries attend to the whole
    prompt; a policy only chooses afterwards what its slot keeps), so run it once: the first backend
    attends, and every backend writes its own slot from the same keys (a policy's selection step)."""

    def __init__(self, backends: list[PrefillBackend], staged: tuple[KVPool, int], positions: torch.Tensor):
        self.backends, self.staged, self.positions = backends, staged, positions

    def attend(self, layer: int, q, k, v):
        first, *rest = self.backends
        out = first.attend(layer, q, k, v)
        pk, pv, ppos = self.staged[0].layer_entries(layer, self.staged[1])
        keys, values = torch.cat([pk, k[0]], 1), torch.cat([pv, v[0]], 1)
        key_pos = torch.cat([ppos, self.positions.expand(k.shape[1], -1)], 1)
        for backend in rest:
            backend.write_global(layer, q[0], keys, values, key_pos)
        return out


def _start(llm: LLM, ids: list[int], staged, n_staged: int, policies: list, max_new: int):
    """All of a sample's cells as one batch: the final chunk runs once from the shared staging slot
    (read only) into every policy's compressed slot; then the cells decode together."""
    cap = max(p.capacity(len(ids), max_new) for p in policies)
    engine = llm.engine(len(policies), cap)
    seqs = [engine.add_request(ids, SamplingParams(max_new_tokens=max_new), p) for p in policies]
    engine.scheduler.admit()
    positions = torch.arange(n_staged, len(ids))
    backends = [PrefillBackend(engine.pool, s.slot, positions, staging=staged) for s in seqs]
    with torch.inference_mode():
        logits = llm.loaded.model(
            torch.tensor([ids[n_staged:]]), positions[None], FanOut(backends, staged, positions)
        )
    for backend, seq in zip(backends, seqs, strict=True):
        backend.finish()
        seq.prefilled = len(ids)
        engine.runner.record(seq)
    return engine, seqs, logits


def answer(llm, ids, staged, n_staged, policies, max_new) -> list[tuple[str, int]]:
    """Query-aware: the question is in the compressed prompt. Returns (answer, KV bytes) per policy."""
    engine, seqs, logits = _start(llm, ids, staged, n_staged, policies, max_new)
    engine.emit(seqs, logits.expand(len(seqs), -1))
    while engine.has_unfinished():
        engine.step()
    return [(s.text, s.stats()["kv_bytes_final"]) for s in seqs]


def answer_agnostic(llm, ctx_ids, q_ids, staged, n_staged, policies, max_new) -> list[tuple[str, int]]:
    """Query-agnostic: compress the context without the question, then append it and answer."""
    engine, seqs, _ = _start(llm, ctx_ids, staged, n_staged, policies, 1)
    contexts = [
        CompressedContext.from_slot(
            engine.pool, seq.slot, llm.fingerprint, {"name": policy.name}, len(ctx_ids)
        )
        for seq, policy in zip(seqs, policies, strict=True)
    ]
    del engine
    params = SamplingParams(max_new_tokens=max_new)
    asking = llm.engine(len(contexts), max(c.fill for c in contexts) + len(q_ids) + max_new)
    seqs = [asking.add_request(q_ids, params, FullPolicy(), prefix=ctx) for ctx in contexts]
    while asking.has_unfinished():
        asking.step()
    return [(s.text, ctx.nbytes) for s, ctx in zip(seqs, contexts, strict=True)]  # the stored context's bytes


def build_policy(name: str, budget: int | None):
    """`snapkv+ada` = SnapKV with head-adaptive (AdaKV) budgets."""
    base, ada = name.removesuffix("+ada"), name.endswith("+ada")
    return make_policy(base, budget=budget, **({"head_adaptive": True} if ada else {}))


def label_of(name: str, budget: int | None) -> str:
    return name if budget is None else f"{name}@{budget}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--samples", default="20,10", help="samples per length (one value or one per length)")
    ap.add_argument("--budgets", default="128,256,512,1024")
    ap.add_argument(
        "--policies",
        default="streaming,snapkv,sage,snapstream,h2o,knorm,random,snapkv+ada,sage+ada",
        help="'+ada' = head-adaptive (AdaKV) budgets",
    )
    ap.add_argument("--settings", default="query_aware,query_agnostic")
    ap.add_argument("--tail", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="bench/results/kv_accuracy")
    args = ap.parse_args()
    llm = LLM(args.model, dtype=args.dtype, progress=False)
    assert not any(llm.loaded.args.layer_windows), "staging reuse assumes no sliding-window layers"
    lengths = [int(x) for x in args.lengths.split(",")]
    samples = [int(x) for x in args.samples.split(",")]
    samples = samples * len(lengths) if len(samples) == 1 else samples
    budgets = [int(x) for x in args.budgets.split(",")]
    settings = args.settings.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    done = (
        {(r["length"], r["sample"], r["setting"], r["label"]) for r in map(json.loads, jsonl.open())}
        if jsonl.exists()
        else set()
    )
    cells = [("full", None)] + [(p, b) for p in args.policies.split(",") for b in budgets]
    total = sum(n for n in samples) * len(settings) * len(cells)
    bar = tqdm(total=total, desc="kv accuracy", unit="cell", initial=len(done))
    with jsonl.open("a") as sink:
        for length, n_samples in zip(lengths, samples, strict=True):
            for i in range(n_samples):
                rng = random.Random(f"{length}-{i}")
                key, depth = rng.randint(10000, 99999), (i + 0.5) / n_samples
                context = passkey_context(llm.tokenizer, key, length, depth)
                ctx_ids = llm.tokenizer.encode(context)
                q_ids = llm.tokenizer.encode(QUESTION, add_special_tokens=False)
                ids = ctx_ids + q_ids
                staged = None
                for setting in settings:
                    todo = [(n, b) for n, b in cells if (length, i, setting, label_of(n, b)) not in done]
                    if not todo:
                        continue
                    if staged is None:
                        n_staged = len(ctx_ids) - args.tail
                        staged = prefill_staging(llm, ctx_ids[:n_staged])
                    answers = []
                    for group in ([c for c in todo if c[1] is None], [c for c in todo if c[1] is not None]):
                        if not group:  # the full cache alone; the compressed cells batch in small slots
                            continue
                        policies = [build_policy(n, b) for n, b in group]
                        if setting == "query_aware":
                            got = answer(llm, ids, staged, n_staged, policies, args.max_new_tokens)
                        else:
                            got = answer_agnostic(
                                llm, ctx_ids, q_ids, staged, n_staged, policies, args.max_new_tokens
                            )
                        answers += list(zip(group, got, strict=True))
                    for (name, budget), (text, kv_bytes) in answers:
                        row = {
                            "length": length,
                            "sample": i,
                            "setting": setting,
                            "label": label_of(name, budget),
                            "policy": name,
                            "budget": budget,
                            "prompt_tokens": len(ids),
                            "depth": depth,
                            "key": key,
                            "prediction": text,
                            "correct": str(key) in text,
                            "kv_bytes": kv_bytes,
                        }
                        sink.write(json.dumps(row) + "\n")
                        sink.flush()
                        bar.update()
    bar.close()
    report(out, jsonl, budgets, command(), args.model)


def report(out: Path, jsonl: Path, budgets: list[int], command: str, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.open()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["length"], r["setting"], r["label"]), []).append(r)
    summary = []
    for (length, setting, label), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        full = groups.get((length, setting, "full"), [])
        full_acc = sum(r["correct"] for r in full) / max(1, len(full))
        acc = sum(r["correct"] for r in rs) / len(rs)
        summary.append(
            {
                "length": length,
                "setting": setting,
                "label": label,
                "policy": rs[0]["policy"],
                "budget": rs[0]["budget"],
                "n": len(rs),
                "accuracy": acc,
                "relative_to_full": acc / full_acc if full_acc else None,
                "kv_mib": sum(r["kv_bytes"] for r in rs) / len(rs) / 2**20,
                "prompt_tokens": sum(r["prompt_tokens"] for r in rs) / len(rs),
            }
        )
    meta = {"command": command, "model": model, "date": time.strftime("%Y-%m-%d %H:%M")}
    lines = [
        f"# KV policy accuracy vs budget: pass-key retrieval, {model}",
        "",
        f"Command: `{command}` "
        f"({meta['date']}). Accuracy = key found in a greedy answer; n samples per cell, needle depths "
        "spread evenly over the context.",
        "",
    ]
    for length in sorted({s["length"] for s in summary}):
        for setting in sorted({s["setting"] for s in summary}):
            cell = {s["label"]: s for s in summary if s["length"] == length and s["setting"] == setting}
            if not cell:
                continue
            full = cell.get("full")
            lines += [
                f"## {length} tokens, {setting} (full cache: {full['accuracy']:.0%}, n={full['n']}, "
                f"{full['kv_mib']:.0f} MiB)"
                if full
                else f"## {length} tokens, {setting}",
                "",
                "| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |",
                "|---|" + "---|" * len(budgets),
            ]
            for policy in sorted({s["policy"] for s in cell.values()} - {"full"}):
                vals = [cell.get(f"{policy}@{b}") for b in budgets]
                lines.append(
                    f"| {policy} | "
                    + " | ".join(f"{v['accuracy']:.0%} ({v['kv_mib']:.1f} MiB)" if v else "-" for v in vals)
                    + " |"
                )
            lines.append("")
    write_result(out, {"meta": meta, "summary": summary}, "\n".join(lines))
    panels = sorted({(s["length"], s["setting"]) for s in summary})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (length, setting) in zip(axes[0], panels, strict=True):
        cell = [s for s in summary if s["length"] == length and s["setting"] == setting]
        for policy in sorted({s["policy"] for s in cell} - {"full"}):
            pts = sorted((s["budget"], s["accuracy"]) for s in cell if s["policy"] == policy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        full = [s for s in cell if s["policy"] == "full"]
        if full:
            ax.axhline(full[0]["accuracy"], color="black", linestyle="--", label="full")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{length} tokens, {setting}")
        ax.set_xlabel("KV budget (tokens)")
        ax.set_ylabel("pass-key accuracy")
        ax.set_ylim(-0.05, 1.05)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
