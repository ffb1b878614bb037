"""`make demo`: one long document, one question, answered under several KV policies side by side."""

from __future__ import annotations

import time
from importlib import resources

from rich.console import Console
from rich.table import Table

DOCUMENT = "demo_document.md"
QUESTION = "Who led the Cedar Ridge pumping station project? Answer with the person's name."
EXPECTED = "Ilse Varga"


def document() -> str:
    return resources.files("longserve.data").joinpath(DOCUMENT).read_text()


def run_demo(
    model: str | None = None, budget: int = 256, policies: str = "full,streaming,snapkv,sage,snapstream"
) -> int:
    from longserve.llm import LLM
    from longserve.zoo import DEFAULT_MODEL

    console = Console(width=170)
    llm = LLM(model or DEFAULT_MODEL)
    messages = [{"role": "user", "content": f"{document()}\n\nQuestion: {QUESTION}"}]
    n_prompt = len(llm.encode(messages))
    console.print(
        f"[bold]{llm.loaded.name}[/] | document + question: {n_prompt} tokens | KV budget {budget} tokens\n"
        f"Q: {QUESTION}"
    )
    table = Table(title="KV policies side by side (greedy)")
    for col in ("policy", "answer", "found", "KV held", "KV vs full", "TTFT s", "decode tok/s"):
        table.add_column(col)
    full_bytes = None
    for name in policies.split(","):
        start = time.perf_counter()
        out = llm.generate(
            messages, max_new_tokens=32, kv_policy=name, kv_budget=None if name == "full" else budget
        )[0]
        stats = out.stats
        full_bytes = full_bytes or (stats["kv_bytes_final"] if name == "full" else None)
        share = f"{stats['kv_bytes_final'] / full_bytes:.0%}" if full_bytes else "-"
        found = "yes" if EXPECTED.lower() in out.text.lower() else "no"
        tps = stats["decode_tokens_per_s"]
        table.add_row(
            name,
            out.text.strip().replace("\n", " ")[:90],
            found,
            f"{stats['kv_bytes_final'] / 2**20:.1f} MiB",
            share,
            f"{stats['ttft_s']:.2f}",
            f"{tps:.1f}" if tps else "-",
        )
        console.log(f"{name} done in {time.perf_counter() - start:.1f} s")
    console.print(table)
    return 0
