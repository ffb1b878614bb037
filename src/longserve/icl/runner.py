"""Many-shot prompting: a demonstration block in front of every query, compressed once and reused.

A static block (the same demonstrations for every query) is the same prefix for every request: it is
prefilled (and compressed, under any KV policy) once into a `CompressedContext`, and each query pays
only for its own tokens. `reuse=False` re-prefills the block for every query (the baseline the reuse
is measured against, on the very same token ids). `dynamic` picks demonstrations per query (nothing
to reuse); `reinforce` labels inputs with the model itself and keeps the answers that check correct
(Reinforced ICL).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from longserve.errors import InvalidParameterError
from longserve.icl.selection import Embed, order, select
from longserve.icl.tasks import Example, Task
from longserve.llm import Completion


@dataclass
class ShotConfig:
    shots: int
    selection: str = "random"
    ordering: str = "random"
    kv_policy: str = "full"
    kv_ratio: float | None = None
    reuse: bool = True  # compress the static block once (False: re-prefill it for every query)
    dynamic: bool = False  # per-query selection (implies no reuse)
    seed: int = 0

    @property
    def label(self) -> str:
        kv = self.kv_policy if self.kv_ratio is None else f"{self.kv_policy}@{self.kv_ratio:g}"
        mode = "dynamic" if self.dynamic else ("reuse" if self.reuse else "re-prefill")
        return f"{self.shots} shots, {self.selection}/{self.ordering}, {kv}, {mode}"


@dataclass
class QueryResult:
    input: str
    target: str
    prediction: str
    score: float
    ttft_s: float
    prompt_tokens: int  # tokens prefilled for this query (the query alone when the block is reused)
    kv_bytes: int


@dataclass
class ShotResult:
    config: ShotConfig
    queries: list[QueryResult]
    block_tokens: int
    block_prefill_s: float  # once, for a reused block; 0 otherwise
    block_kv_bytes: int
    fits: bool = True
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = len(self.queries)
        ttfts = [q.ttft_s for q in self.queries]
        return {
            **asdict(self.config),
            "n": n,
            "accuracy": sum(q.score for q in self.queries) / n if n else None,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "prompt_tokens_mean": sum(q.prompt_tokens for q in self.queries) / n if n else None,
            "block_tokens": self.block_tokens,
            "block_prefill_s": self.block_prefill_s,
            "block_kv_bytes": self.block_kv_bytes,
            "kv_bytes_mean": sum(q.kv_bytes for q in self.queries) / n if n else None,
        }


class ManyShot:
    """`ManyShot(llm, task, embed=Embedder(llm)).run(pool, test, ShotConfig(64))`.

    `chat=False` (default) lays the demonstrations out as plain text that the query continues
    ("Input: ...\nOutput:"), the format in which small models pick up a pattern; `chat=True` puts them
    in one user turn (the answer then comes in the assistant's turn)."""

    def __init__(self, llm, task: Task, embed: Embed | None = None, chat: bool = False):
        self.llm, self.task, self.embed, self.chat = llm, task, embed, chat

    # ---- prompts -------------------------------------------------------------------------------
    def block(self, demos: list[Example]) -> str:
        shots = "".join(f"Input: {ex.input}\nOutput: {ex.target}\n\n" for ex in demos)
        return f"{self.task.instruction}\n\n{shots}".rstrip("\n")

    @staticmethod
    def query(example: Example) -> str:
        return f"Input: {example.input}\nOutput:"

    def block_ids(self, block: str) -> list[int]:
        """Token ids of the demonstration block: the reusable prefix, the same for every query."""
        if self.chat:
            return self.llm.split_chat(block, "")[0]
        return self.llm.tokenizer.encode(block + "\n\n", add_special_tokens=True)

    def query_ids(self, query: str) -> list[int]:
        """Token ids of one query after the block (in chat form: the rest of the user turn)."""
        if self.chat:
            return self.llm.split_chat("", query)[1]
        return self.llm.tokenizer.encode(query, add_special_tokens=False)

    def block_tokens(self, demos: list[Example]) -> int:
        return len(self.block_ids(self.block(demos)))

    def answer(self, head: list[int], tail: list[int], ctx=None, **policy):
        """One query's completion: on top of a reused block `ctx`, or with the block re-prefilled."""
        sampling = {
            "max_new_tokens": self.task.max_new_tokens,
            "stop": None if self.chat else list(self.task.stop),
        }
        if ctx is None:
            return self.llm.generate(head + tail, **sampling, **policy)[0]
        *_, last = self.llm.stream(tail, prefix=ctx, **sampling)
        seq = last.seq
        return Completion(seq.text, seq.output_ids, seq.prompt_len, seq.finish_reason, seq.stats())

    def max_shots(self, pool: list[Example], limit: int | None = None) -> int:
        """The most demonstrations of `pool` (in order) whose block plus the longest query and answer fit
        the context window."""
        window = self.llm.context_window - self.task.max_new_tokens - 64
        lo, hi = 0, min(len(pool), limit or len(pool))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.block_tokens(pool[:mid]) <= window else (lo, mid - 1)
        return lo

    # ---- runs ----------------------------------------------------------------------------------
    def demos_for(
        self, pool: list[Example], config: ShotConfig, anchor: torch.Tensor | None
    ) -> list[Example]:
        picked = select(
            pool, config.shots, config.selection, seed=config.seed, embed=self.embed, anchor=anchor
        )
        return order(picked, config.ordering, seed=config.seed, embed=self.embed, anchor=anchor)

    def centroid(self, examples: list[Example]) -> torch.Tensor | None:
        if self.embed is None:
            return None
        return torch.nn.functional.normalize(self.embed([ex.input for ex in examples]).mean(0), dim=-1)

    def run(
        self, pool: list[Example], test: list[Example], config: ShotConfig, progress: bool = False
    ) -> ShotResult:
        if config.dynamic:
            return self._run_dynamic(pool, test, config, progress)
        demos = self.demos_for(pool, config, self.centroid(test))
        head = self.block_ids(self.block(demos))  # tokenized once; each query adds only its own ids
        n_block = len(head)
        if n_block + self.task.max_new_tokens + 64 > self.llm.context_window:
            return ShotResult(config, [], n_block, 0.0, 0, fits=False)
        policy = {"kv_policy": config.kv_policy, "kv_ratio": config.kv_ratio}
        ctx, prefill_s = None, 0.0
        if config.reuse:
            start = time.perf_counter()
            ctx = self.llm.compress(head, **policy)
            prefill_s = time.perf_counter() - start
        results = []
        for ex in tqdm(test, disable=not progress, desc=config.label, unit="query"):
            tail = self.query_ids(self.query(ex))
            out = self.answer(head, tail, ctx) if ctx is not None else self.answer(head, tail, **policy)
            results.append(self._result(ex, out))
        return ShotResult(config, results, n_block, prefill_s, ctx.nbytes if ctx is not None else 0)

    def _run_dynamic(self, pool, test, config, progress) -> ShotResult:
        if self.embed is None and config.selection in ("similar", "diverse"):
            raise InvalidParameterError("dynamic selection by similarity needs an embedding model")
        results, blocks = [], []
        for ex in tqdm(test, disable=not progress, desc=config.label, unit="query"):
            anchor = self.embed([ex.input])[0] if self.embed is not None else None
            demos = self.demos_for(pool, config, anchor)
            head, tail = self.block_ids(self.block(demos)), self.query_ids(self.query(ex))
            blocks.append(len(head))
            out = self.answer(head, tail, kv_policy=config.kv_policy, kv_ratio=config.kv_ratio)
            results.append(self._result(ex, out))
        return ShotResult(config, results, round(sum(blocks) / max(1, len(blocks))), 0.0, 0)

    def _result(self, ex: Example, out) -> QueryResult:
        return QueryResult(
            ex.input,
            ex.target,
            out.text,
            self.task.score(out.text, ex),
            out.stats.get("ttft_s") or 0.0,
            out.prompt_tokens,
            out.stats.get("kv_bytes_final", 0),
        )

    def reinforce(
        self, unlabelled: list[Example], seed_demos: list[Example], progress: bool = False
    ) -> list[Example]:
        """Reinforced ICL: answer each input with the model (given `seed_demos`), keep the correct
        answers as new demonstrations (the model's own output, which the checker accepted)."""
        head = self.block_ids(self.block(seed_demos))
        kept = []
        for ex in tqdm(unlabelled, disable=not progress, desc="reinforce", unit="input"):
            text = self.answer(head, self.query_ids(self.query(ex))).text
            if self.task.check(text, ex)[0]:
                answer = text.strip().splitlines()[0].strip() if self.task.single_line else text.strip()
                kept.append(Example(ex.input, answer, ex.label))
        return kept
