"""Runs the model over the KV pool: one prefill chunk of one sequence, or one decode step of a batch."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from longserve.engine.sequence import Sequence
from longserve.errors import InvalidParameterError
from longserve.kv.attention import DecodeBackend, PrefillBackend
from longserve.kv.cache import KVPool
from longserve.kv.policies import FullPolicy
from longserve.kv.scoring_pass import run_scoring_pass
from longserve.model import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, tokenizer=None):
        """`tokenizer`: for policies whose scoring pass is built from text (KVzip's repeat prompt)."""
        self.model, self.pool, self.tokenizer = model, pool, tokenizer
        self.inv_freq = [model.layer_inv_freq(layer) for layer in range(pool.args.n_layers)]
        self.staging: dict[int, tuple[KVPool, int]] = {}  # seq_id -> uncompressed prefix of a chunked prefill

    def needs_staging(self, seq: Sequence) -> bool:
        return seq.policy.kept(seq.prompt_len) < seq.prompt_len

    @torch.inference_mode()
    def prefill(self, seq: Sequence, n_tokens: int) -> torch.Tensor | None:
        """Run the next `n_tokens` of the prompt; returns the last logits once the prompt is done.

        A policy with a scoring pass (`Policy.scoring_pass`, KVzip) has every prompt token but the
        last staged uncompressed, its pass run over them, then the last token selects what the slot
        keeps with the pass's scores (the normal final chunk: positions and book-keeping as usual)."""
        if seq.prefilled == 0 and seq.prefix is not None:
            seq.prefix.load_into(self.pool, seq.slot)
        start, end = seq.prefilled, seq.prefilled + n_tokens
        final = end == seq.prompt_len
        if not (final and seq.prompt_len > 1 and self.needs_staging(seq)):
            return self._run(seq, start, end, final)
        chunks = seq.policy.scoring_pass(seq.prompt_ids[:-1], self.tokenizer)
        if chunks is None:
            return self._run(seq, start, end, final)
        if seq.prefix is not None:
            raise InvalidParameterError(
                f"policy '{seq.policy.name}' cannot compress a prompt on top of a prefix"
            )
        if end - 1 > start:
            self._run(seq, start, end - 1, final=False)
        started = time.perf_counter()
        staged = self.staging[seq.seq_id]
        scores = run_scoring_pass(self.model, staged, (self.pool, seq.slot), chunks, end - 1)
        seq.scoring_pass_tokens += sum(len(c.ids) for c in chunks)
        seq.scoring_pass_s += time.perf_counter() - started
        last = [None if s is None else F.pad(s, (0, 1), value=float("inf")) for s in scores]
        return self._run(seq, end - 1, end, final=True, pass_scores=last)

    def _run(
        self,
        seq: Sequence,
        start: int,
        end: int,
        final: bool,
        pass_scores: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor | None:
        staging = self.staging.get(seq.seq_id)
        if not final and staging is None and self.needs_staging(seq):
            staging_pool = KVPool(
                self.pool.args, 1, seq.prompt_len, dtype=self.pool.dtype, device=self.pool.device
            )
            staging = self.staging[seq.seq_id] = (staging_pool, staging_pool.allocate(FullPolicy()))
        device = self.pool.device
        ids = torch.tensor([seq.prompt_ids[start:end]], device=device)
        offset = seq.prefix.next_pos if seq.prefix is not None else 0
        positions = torch.tensor(
            seq.prompt_positions[start:end] if seq.prompt_positions else range(offset + start, offset + end)
        )  # on the host: the pool's plan reads the next position from it, then moves it to the device
        backend = PrefillBackend(
            self.pool,
            seq.slot,
            positions,
            final=final,
            seed=seq.params.seed or 0,
            staging=staging,
            pass_scores=pass_scores,
            inv_freq=self.inv_freq,
        )
        logits = self.model(ids, backend.positions[None], backend)
        backend.finish()
        seq.prefilled = end
        if final:
            self.staging.pop(seq.seq_id, None)
            self.record(seq)
            return logits
        return None

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for every sequence: their last sampled tokens go in, next-token logits come out."""
        plan = self.pool.plan_decode([s.slot for s in seqs])
        ids = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.pool.device)
        logits = self.model(ids, plan.positions[:, None], DecodeBackend(self.pool, plan))
        self.pool.commit(plan)
        for seq in seqs:
            self.record(seq)
        return logits

    def record(self, seq: Sequence) -> None:
        state = self.pool.slots[seq.slot]
        held = self.pool.held_nbytes(seq.slot)
        seq.kv_bytes_allocated = self.pool.slot_nbytes()
        seq.kv_bytes_peak = max(seq.kv_bytes_peak, held)
        seq.kv_bytes_final = held
        seq.kv_tokens_final = state.fill
        seq.kv_bytes_read = state.bytes_read

    def release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            seq.kv_tokens_per_layer = self.pool.tokens_per_layer(seq.slot)
            seq.kv_tokens_per_head = self.pool.tokens_per_head(seq.slot)
            self.pool.free(seq.slot)
            seq.slot = None
        self.staging.pop(seq.seq_id, None)
