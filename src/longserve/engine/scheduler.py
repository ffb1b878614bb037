"""FIFO scheduler: waiting and running queues, admission by free KV slots, chunked prefill.

Each slot's capacity is fixed when the pool is built and a sequence is admitted only if its policy's
capacity fits, so a running sequence can never run out of KV memory: admission is exact and no
preemption is needed (with `snapstream` a sequence costs exactly its budget).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from longserve.engine.sequence import Sequence, Status
from longserve.errors import InvalidParameterError
from longserve.kv.cache import KVPool


@dataclass
class Step:
    """A decode step over `seqs`, or a prefill step: the sequences still prefilling, in order, which
    share `n_tokens` prompt tokens. The engine runs them one after the other until the budget is spent
    (vLLM batches prefills within `max_num_batched_tokens` the same way): a prompt whose prefix is cached
    costs only its suffix, so many such prompts start in one step instead of one per decode step."""

    kind: str  # "prefill" or "decode"
    seqs: list[Sequence]
    n_tokens: int = 0  # prefill: the step's token budget


class Scheduler:
    def __init__(
        self,
        pool: KVPool,
        prefill_chunk: int = 2048,
        max_waiting: int | None = None,
        max_step_tokens: int | None = None,
    ):
        """`prefill_chunk`: prompt tokens per prefill step while nothing decodes. `max_step_tokens`:
        while sequences decode, a prefill step runs at most this many tokens minus one per decoding
        sequence (vLLM's `max_num_batched_tokens`), so a long prompt arriving delays every running
        stream by one bounded chunk, not by its whole prefill; None = `prefill_chunk`."""
        if max_step_tokens is not None and max_step_tokens < 1:
            raise InvalidParameterError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        self.pool, self.prefill_chunk, self.max_waiting = pool, prefill_chunk, max_waiting
        self.max_step_tokens = max_step_tokens
        # called with each sequence as it takes a slot (the server counts its queue with it)
        self.on_admit: Callable[[Sequence], None] | None = None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._last = "decode"

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> None:
        while self.waiting and self.pool.n_free:
            seq = self.waiting.popleft()
            seq.slot = self.pool.allocate(seq.policy)
            seq.status = Status.RUNNING
            self.running.append(seq)
            if self.on_admit is not None:
                self.on_admit(seq)

    def chunk(self, seq: Sequence, limit: int | None = None) -> int:
        """Prompt tokens of `seq` to run in its next prefill step, at most `limit` (default the chunk)."""
        limit = min(self.prefill_chunk, limit or self.prefill_chunk)
        remaining = seq.prompt_len - seq.prefilled
        if remaining <= limit:
            return remaining
        # the final chunk must hold the policy's observation window (its queries vote), even when the
        # window is longer than a chunk
        tail = max(seq.policy.window, 1)
        return min(limit, remaining - tail) if remaining > tail else remaining

    def schedule(self) -> Step | None:
        self.admit()
        prefilling = [s for s in self.running if s.prefilled < s.prompt_len]
        decoding = [s for s in self.running if s.prefilled == s.prompt_len]
        # alternate prefill steps and decode steps so a long prompt does not stall the batch
        if prefilling and (not decoding or self._last == "decode"):
            self._last = "prefill"
            budget = (
                max(1, self.max_step_tokens - len(decoding))
                if decoding and self.max_step_tokens
                else self.prefill_chunk
            )
            return Step("prefill", prefilling, budget)
        if decoding:
            self._last = "decode"
            return Step("decode", decoding)
        return None

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
