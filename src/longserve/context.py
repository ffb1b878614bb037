"""Compress once, ask many: a compressed context that can be saved, loaded and queried repeatedly.

The context is compressed before any question is known (query-agnostic, the fair setting), so the
same cache answers every later question. Saved as safetensors with an atomic rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longserve.errors import InvalidParameterError
from longserve.kv.cache import KVPool

FORMAT_VERSION = 1


@dataclass
class CompressedContext:
    model_fingerprint: str
    policy: dict  # name + parameters, for the record and for checks
    n_context_tokens: int
    next_pos: int
    written: int
    fill: int
    keys: list[torch.Tensor]  # per layer [Hkv, n_l, D]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    meta: dict = field(default_factory=dict)
    heads: list[torch.Tensor] | None = None  # head-adaptive contexts: each entry's KV head (flat layout)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def layer_shift(self, layer_windows: list[int]) -> tuple[int, ...] | None:
        """Per layer, tokens fewer than `fill` a global layer holds (per-layer budgets); None: none."""
        shift = tuple(
            0 if w else k.shape[1] - self.fill for k, w in zip(self.keys, layer_windows, strict=True)
        )
        return shift if any(shift) else None

    @classmethod
    def from_slot(
        cls, pool: KVPool, slot: int, fingerprint: str, policy: dict, n_tokens: int, copy: bool = True
    ) -> CompressedContext:
        """The slot's entries, copied (or, with `copy=False` on a per-head slot, views of the pool that
        the next step overwrites: for a caller that copies what it keeps at once)."""
        state = pool.slots[slot]
        if state.flat:  # stored as [Hkv, fill] blocks of the flat entry list, with each entry's head
            if any(pool.args.layer_windows):
                raise InvalidParameterError(
                    "head-adaptive contexts of sliding-window models cannot be stored"
                )
            hkv = pool.args.n_kv_heads
            entries = [pool.flat_entries(layer, slot) for layer in range(pool.args.n_layers)]
            shapes = [(hkv, len(p) // hkv) for _, _, p, _ in entries]  # layers may differ (per-layer budgets)
            return cls(
                fingerprint,
                policy,
                n_tokens,
                state.next_pos,
                state.written,
                state.fill,
                [k.reshape(*sh, -1).clone() for (k, _, _, _), sh in zip(entries, shapes, strict=True)],
                [v.reshape(*sh, -1).clone() for (_, v, _, _), sh in zip(entries, shapes, strict=True)],
                [p.reshape(sh).clone() for (_, _, p, _), sh in zip(entries, shapes, strict=True)],
                heads=[h.reshape(sh).clone() for (_, _, _, h), sh in zip(entries, shapes, strict=True)],
            )
        entries = [pool.layer_entries(layer, slot) for layer in range(pool.args.n_layers)]
        return cls(
            fingerprint,
            policy,
            n_tokens,
            state.next_pos,
            state.written,
            state.fill,
            [k.clone() if copy else k for k, _, _ in entries],
            [v.clone() if copy else v for _, v, _ in entries],
            [p.clone() if copy else p for _, _, p in entries],
        )

    def load_into(self, pool: KVPool, slot: int) -> None:
        for layer, (k, v, p) in enumerate(zip(self.keys, self.values, self.positions, strict=True)):
            n = k.shape[1]
            if self.heads is not None:
                fk, fv, fpos, fheads = pool.flat_view(layer, slot)
                e = k.shape[0] * n
                fk[:e], fv[:e] = k.reshape(e, -1), v.reshape(e, -1)
                fpos[:e], fheads[:e] = p.reshape(e), self.heads[layer].reshape(e)
                continue
            pool.k[layer][slot, :, :n] = k
            pool.v[layer][slot, :, :n] = v
            pool.pos[layer][slot, :, :n] = p
        pool.commit_loaded(
            slot,
            self.fill,
            self.written,
            self.next_pos,
            flat=self.heads is not None,
            layer_shift=self.layer_shift(pool.args.layer_windows),
        )

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {}
        for i, (k, v, p) in enumerate(zip(self.keys, self.values, self.positions, strict=True)):
            tensors[f"k.{i}"], tensors[f"v.{i}"], tensors[f"pos.{i}"] = (
                k.contiguous().cpu(),
                v.contiguous().cpu(),
                p.contiguous().cpu(),
            )
            if self.heads is not None:
                tensors[f"heads.{i}"] = self.heads[i].contiguous().cpu()
        header = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "policy": self.policy,
            "n_context_tokens": self.n_context_tokens,
            "next_pos": self.next_pos,
            "written": self.written,
            "fill": self.fill,
            "meta": self.meta,
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"longserve": json.dumps(header)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None) -> CompressedContext:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("longserve", "{}"))
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except Exception as exc:
            raise InvalidParameterError(f"{path} is not a saved longserve context ({exc})") from None
        if header.get("format_version") != FORMAT_VERSION:
            raise InvalidParameterError(
                f"{path} was saved by format version {header.get('format_version')}; this longserve reads "
                f"version {FORMAT_VERSION}: compress the context again"
            )
        if expected_fingerprint and header["model_fingerprint"] != expected_fingerprint:
            raise InvalidParameterError(
                f"{path} was compressed with another model ({header['model_fingerprint']}); it cannot be "
                f"used with {expected_fingerprint}"
            )
        n = len([k for k in tensors if k.startswith("k.")])
        return cls(
            header["model_fingerprint"],
            header["policy"],
            header["n_context_tokens"],
            header["next_pos"],
            header["written"],
            header["fill"],
            [tensors[f"k.{i}"] for i in range(n)],
            [tensors[f"v.{i}"] for i in range(n)],
            [tensors[f"pos.{i}"] for i in range(n)],
            header["meta"],
            [tensors[f"heads.{i}"] for i in range(n)] if "heads.0" in tensors else None,
        )
