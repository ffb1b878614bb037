"""A request's life: its tokens, its sampling parameters, its KV policy, its slot and its statistics."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from longserve.engine.sampler import Constraint, SamplingParams
from longserve.kv.policies import Policy

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    policy: Policy
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already run through the model
    prompt_positions: list[int] | None = None  # explicit positions (speculative prefill keeps gaps)
    prefix: object | None = None  # a CompressedContext loaded into the slot before the prompt runs
    prefix_tokens: int = 0  # prompt tokens `prefix` stands for (prefix cache, hit or new; not in prompt_ids)
    cached_tokens: int = 0  # of those, the ones the prefix cache already held
    cache_ids: list[int] | None = None  # the whole prompt, for the prefix cache (None: not cacheable)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    constraint: Constraint | None = None  # this sequence's grammar matcher (from params.grammar)
    text: str = ""  # detokenized output so far (stop strings are matched on it)
    detok_offsets: tuple[int, int] = (0, 0)  # output ids: start of the last emitted piece, end of it
    # timings and memory, reported in the request stats
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    kv_bytes_allocated: int = 0  # physical size of the slot's K/V tensors
    kv_bytes_peak: int = 0  # most K/V bytes the slot held at once
    kv_bytes_final: int = 0
    kv_tokens_final: int = 0  # tokens held per global layer at the end
    kv_tokens_per_layer: list[int] = field(default_factory=list)
    kv_tokens_per_head: list[list[int]] | None = None  # head-adaptive slots: [layer][kv head]
    kv_bytes_read: int = 0  # K/V bytes attention read during decode
    scoring_pass_tokens: int = 0  # tokens a policy's scoring pass ran over the prompt (KVzip: ~1x prompt)
    scoring_pass_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"req-{self.seq_id}"
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        elif not self.params.greedy:
            self.generator = torch.Generator().manual_seed(torch.seed() % (2**63))
        if self.params.grammar is not None and self.constraint is None:
            self.constraint = self.params.grammar.matcher()

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def stats(self) -> dict:
        """Per-request statistics: timing, KV bytes held (peak and final) and compression ratio."""
        ttft = (self.first_token_at - self.arrival) if self.first_token_at else None
        decode_s = (self.token_times[-1] - self.token_times[0]) if len(self.token_times) > 1 else 0.0
        return {
            "prompt_tokens": self.prompt_len + self.prefix_tokens,
            "cached_prompt_tokens": self.cached_tokens,
            "completion_tokens": len(self.output_ids),
            "ttft_s": ttft,
            "decode_tokens_per_s": (len(self.token_times) - 1) / decode_s if decode_s > 0 else None,
            "kv_policy": self.policy.name,
            "kv_bytes_allocated": self.kv_bytes_allocated,
            "kv_bytes_peak": self.kv_bytes_peak,
            "kv_bytes_final": self.kv_bytes_final,
            "kv_tokens_final": self.kv_tokens_final,
            "kv_tokens_per_layer": self.kv_tokens_per_layer,
            "kv_tokens_per_head": self.kv_tokens_per_head,
            "compression_ratio": (self.prompt_len + self.prefix_tokens + len(self.output_ids))
            / max(1, self.kv_tokens_final),
            "kv_bytes_read": self.kv_bytes_read,
            "scoring_pass_tokens": self.scoring_pass_tokens,
            "scoring_pass_s": self.scoring_pass_s,
            "finish_reason": self.finish_reason,
        }
