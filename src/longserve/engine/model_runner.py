"""Runs the model over the KV pool: one prefill chunk of one sequence, or one decode step of a batch."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from longserve.engine.compiled_decode import StepCompiler
from longserve.engine.sequence import Sequence
from longserve.errors import InvalidParameterError
from longserve.kv.attention import DecodeBackend, PrefillBackend
from longserve.kv.cache import KVPool
from longserve.kv.policies import FullPolicy
from longserve.kv.scoring_pass import run_scoring_pass
from longserve.model import CausalLM


class _Packed:
    """The attention of several sequences' chunks laid side by side: each chunk's own backend."""

    def __init__(self, backends: list[PrefillBackend], sizes: list[int]):
        self.backends, self.sizes = backends, sizes

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        parts = zip(q.split(self.sizes, 2), k.split(self.sizes, 2), v.split(self.sizes, 2), strict=True)
        return torch.cat([b.attend(layer, *p) for b, p in zip(self.backends, parts, strict=True)], 2)


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, compiler: StepCompiler | None = None, tokenizer=None):
        """`compiler`: decode steps that `compiled_decode.eligible` accepts (ring and append policies)
        run its `torch.compile`d graph per batch bucket; other steps, and everything without one, run
        eagerly. `tokenizer`: for policies whose scoring pass is built from text (KVzip's repeat prompt)."""
        self.model, self.pool, self.compiler, self.tokenizer = model, pool, compiler, tokenizer
        self.inv_freq = [model.layer_inv_freq(layer) for layer in range(pool.args.n_layers)]
        self.staging: dict[int, tuple[KVPool, int]] = {}  # seq_id -> uncompressed prefix of a chunked prefill

    def needs_staging(self, seq: Sequence) -> bool:
        total = seq.prefix_tokens + seq.prompt_len
        return seq.policy.kept(total) < total

    def stages_prefix(self, seq: Sequence) -> bool:
        """A cached prefix of a compressing policy's prompt is uncompressed KV: it goes to the staging
        slot, and the final chunk selects from it and the rest of the prompt."""
        return seq.prefix is not None and seq.policy.compresses

    def staged(self, seq: Sequence) -> tuple[KVPool, int] | None:
        """(pool, slot) of the uncompressed prompt prefix a chunked compressing prefill has staged."""
        return self.staging.get(seq.seq_id)

    def runs_scoring_pass(self, seq: Sequence, n_tokens: int) -> bool:
        """Whether this chunk is the final one of a prompt whose policy scores it in a pass first."""
        final = seq.prefilled + n_tokens == seq.prompt_len
        return final and seq.prompt_len > 1 and self.needs_staging(seq) and seq.policy.has_scoring_pass

    @torch.inference_mode()
    def prefill(self, seq: Sequence, n_tokens: int) -> torch.Tensor | None:
        """Run the next `n_tokens` of the prompt; returns the last logits once the prompt is done.

        A policy with a scoring pass (`Policy.scoring_pass`, KVzip) has every prompt token but the
        last staged uncompressed, its pass run over them, then the last token selects what the slot
        keeps with the pass's scores (the normal final chunk: positions and book-keeping as usual)."""
        start, end = seq.prefilled, seq.prefilled + n_tokens
        final = end == seq.prompt_len
        if not self.runs_scoring_pass(seq, n_tokens):
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
        backend, positions = self._backend(seq, start, end, final, pass_scores)
        ids = torch.tensor([seq.prompt_ids[start:end]], device=self.pool.device)
        logits = self.model(ids, positions[None], backend)
        return self._finish(seq, backend, end, final, logits)

    def _backend(self, seq, start, end, final, pass_scores=None) -> tuple[PrefillBackend, torch.Tensor]:
        """The chunk's attention backend (staging the slot first where the policy needs it)."""
        staging = self.staging.get(seq.seq_id)
        first = seq.prefilled == 0
        if staging is None and (
            (not final and self.needs_staging(seq)) or (first and self.stages_prefix(seq))
        ):
            size = seq.prompt_len + (seq.prefix.fill if seq.prefix is not None else 0)
            staging_pool = KVPool(self.pool.args, 1, size, dtype=self.pool.dtype, device=self.pool.device)
            staging = self.staging[seq.seq_id] = (staging_pool, staging_pool.allocate(FullPolicy()))
        if first and seq.prefix is not None:
            seq.prefix.load_into(*(staging if self.stages_prefix(seq) else (self.pool, seq.slot)))
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
        return backend, backend.positions

    def _finish(self, seq, backend: PrefillBackend, end: int, final: bool, logits) -> torch.Tensor | None:
        backend.finish()
        seq.prefilled = end
        if final:
            self.staging.pop(seq.seq_id, None)
            self.record(seq)
            return logits
        return None

    @torch.inference_mode()
    def prefill_packed(self, chunks: list[tuple[Sequence, int]]) -> list[torch.Tensor | None]:
        """Chunks of several sequences in ONE model forward (their tokens side by side, each chunk
        attending only to its own slot): the weights are read once for all of them, as vLLM's varlen
        batches do, which is what a step of short suffixes on cached prefixes needs. Each linear's rows
        do not depend on the row count, so a chunk gets the bits it would get alone. A chunk whose
        policy runs a scoring pass goes alone (`prefill`)."""
        alone = [(s, n) for s, n in chunks if self.runs_scoring_pass(s, n)]
        alone_ids = {s.seq_id for s, _ in alone}
        together = [(s, n) for s, n in chunks if s.seq_id not in alone_ids]
        results = {s.seq_id: self.prefill(s, n) for s, n in alone}
        if len(together) == 1:
            results[together[0][0].seq_id] = self.prefill(*together[0])
        elif together:
            backends, positions, ids = [], [], []
            for seq, n in together:
                start = seq.prefilled
                backend, pos = self._backend(seq, start, start + n, start + n == seq.prompt_len)
                backends.append(backend)
                positions.append(pos)
                ids += seq.prompt_ids[start : start + n]
            sizes = [n for _, n in together]
            packed = _Packed(backends, sizes)
            ids_t = torch.tensor([ids], device=self.pool.device)
            hidden = self.model.hidden_states(ids_t, torch.cat(positions)[None], packed)
            ends = torch.tensor(sizes, device=self.pool.device).cumsum(0) - 1
            logits = self.model.logits(hidden[0, ends])
            for i, ((seq, n), backend) in enumerate(zip(together, backends, strict=True)):
                final = seq.prefilled + n == seq.prompt_len
                results[seq.seq_id] = self._finish(seq, backend, seq.prefilled + n, final, logits[i : i + 1])
        return [results[s.seq_id] for s, _ in chunks]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for every sequence: their last sampled tokens go in, next-token logits come out."""
        plan = self.pool.plan_decode([s.slot for s in seqs])
        ids = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.pool.device)
        logits = self.compiler.run(self.pool, plan, ids) if self.compiler is not None else None
        if logits is None:
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
