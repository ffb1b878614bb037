"""Automatic prefix caching: a prompt that starts like an earlier one reuses that prefix's KV.

Prompts are cut into fixed token blocks, each named by a hash chain over the model fingerprint and
every token up to the end of the block (vLLM's scheme), so a hash names a whole prefix, not a block
out of context: a changed token anywhere misses from its block on. An entry holds the KV of one
prompt's full blocks (a `CompressedContext`, the same object compress-once uses); every block hash of
the entry points to it, so a later prompt that shares only its first blocks still hits. Entries are
evicted least-recently-used under a byte budget counted apart from the running slots.

What is cached automatically: prompts on models without sliding-window layers (a ring layer no longer
holds the start of a long prompt), with their natural positions, under `full` and under policies that
compress at prefill (their uncompressed prefix as staged before the final chunk compresses it). A hit leaves at least
one prompt token to prefill, since the next token's logits come from the last prompt position.

Compressed entries (`CachePrefix`): a request may ask for the first `n_tokens` of its prompt to be
compressed under a policy and kept; a later request with exactly that prefix and policy attaches the
compressed KV and prefills only its own suffix. The entry is named by one hash over the fingerprint,
the policy's parameters and every prefix token (a compressed prefix is not extendable block by block),
and shares the byte budget and the LRU order with the full entries, so one budget holds several times
more compressed prefixes than full ones. No peer caches compressed prefixes: vLLM's blocks hold full KV.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, replace

from longserve.context import CompressedContext
from longserve.errors import InvalidParameterError
from longserve.kv.policies import Policy


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    inserted: int = 0
    evicted: int = 0
    bytes: int = 0
    entries: int = 0
    compressed_entries: int = 0
    compressed_hits: int = 0


@dataclass(frozen=True)
class CachePrefix:
    """Compress the first `n_tokens` of a request's prompt under `policy` and cache the result."""

    n_tokens: int
    policy: Policy

    @classmethod
    def from_spec(cls, spec: dict, n_tokens: int | None) -> CachePrefix:
        """From a request's `{"policy": "snapkv", "ratio": 0.25, "tokens": N, ...policy options}`;
        `n_tokens` is the caller's split (e.g. everything before the last chat turn) when `tokens` is
        not given."""
        from longserve.kv.policies import make_policy

        if not isinstance(spec, dict):
            raise InvalidParameterError(
                'cache_prefix takes {"policy": ..., "ratio" or "budget": ..., "tokens": N}'
            )
        options = dict(spec)
        n = options.pop("tokens", None) or n_tokens
        if not n:
            raise InvalidParameterError(
                "cache_prefix needs the prefix length: 'tokens' (or chat messages, where everything "
                "before the last message is the prefix)"
            )
        name = options.pop("policy", None) or options.pop("name", None) or "full"
        return cls(int(n), make_policy(name, **options))


class PrefixCache:
    def __init__(self, max_bytes: int, fingerprint: str, block_size: int = 16):
        if max_bytes <= 0 or block_size <= 0:
            raise ValueError("the prefix cache needs a positive byte budget and block size")
        self.max_bytes, self.fingerprint, self.block_size = max_bytes, fingerprint, block_size
        self.entries: OrderedDict[int, CompressedContext] = OrderedDict()  # LRU order, oldest first
        self.index: dict[bytes, dict[int, None]] = {}  # block hash -> entries holding that prefix
        self.entry_hashes: dict[int, list[bytes]] = {}
        self.compressed: dict[bytes, int] = {}  # compressed-prefix key -> entry
        self.compressed_key_of: dict[int, bytes] = {}  # and back, so an eviction is O(1)
        self.stats = CacheStats()
        self._next_id = 0

    def block_hashes(self, ids: list[int]) -> list[bytes]:
        """One hash per full block: each covers the fingerprint and every token before its end."""
        digest, out = hashlib.sha256(self.fingerprint.encode()), []
        for start in range(0, len(ids) - self.block_size + 1, self.block_size):
            digest.update(b"".join(t.to_bytes(4, "little") for t in ids[start : start + self.block_size]))
            out.append(digest.copy().digest())
        return out

    def lookup(self, ids: list[int]) -> tuple[CompressedContext | None, int]:
        """(the cached KV of the longest block-aligned prefix of `ids` shorter than `ids`, its length)."""
        hashes = self.block_hashes(ids[:-1])  # keep one token to prefill
        for n_blocks in range(len(hashes), 0, -1):
            holders = self.index.get(hashes[n_blocks - 1])
            if holders:
                entry_id = next(iter(holders))
                self.entries.move_to_end(entry_id)
                n = n_blocks * self.block_size
                self.stats.hits += 1
                self.stats.hit_tokens += n
                return head(self.entries[entry_id], n), n
        self.stats.misses += 1
        return None, 0

    def compressed_key(self, ids: list[int], policy: Policy) -> bytes:
        digest = hashlib.sha256(self.fingerprint.encode())
        digest.update(json.dumps(policy.describe(), sort_keys=True, default=str).encode())
        digest.update(b"".join(t.to_bytes(4, "little") for t in ids))
        return digest.digest()

    def get_compressed(self, key: bytes) -> CompressedContext | None:
        """A cached compressed prefix (counted as a hit over all its prompt tokens), or None (a miss)."""
        entry_id = self.compressed.get(key)
        if entry_id is None:
            self.stats.misses += 1
            return None
        self.entries.move_to_end(entry_id)
        ctx = self.entries[entry_id]
        self.stats.hits += 1
        self.stats.compressed_hits += 1
        self.stats.hit_tokens += ctx.n_context_tokens
        return ctx

    def put_compressed(self, key: bytes, ctx: CompressedContext) -> None:
        if key in self.compressed or not self._make_room(ctx.nbytes):
            return
        entry_id = self._add(ctx, [])
        self.compressed[key] = entry_id
        self.compressed_key_of[entry_id] = key
        self.stats.compressed_entries += 1

    def insert(self, ids: list[int], ctx: CompressedContext) -> None:
        """Cache the full blocks of a prefilled prompt (`ctx` holds its KV in order, position i at i; it
        may be views of a slot: what is kept is copied)."""
        hashes = self.block_hashes(ids[: ctx.fill])
        if not hashes:
            return
        holders = self.index.get(hashes[-1])
        if holders:  # this exact prefix is cached already (a longer entry may hold it too)
            self.entries.move_to_end(next(iter(holders)))
            return
        entry = head(ctx, len(hashes) * self.block_size, copy=True)
        if self._make_room(entry.nbytes):
            self._add(entry, hashes)

    def _make_room(self, nbytes: int) -> bool:
        """Evict least-recently-used entries until `nbytes` fit; False if they never can."""
        if nbytes > self.max_bytes:
            return False
        while self.entries and self.stats.bytes + nbytes > self.max_bytes:
            self._evict(next(iter(self.entries)))
        return True

    def _add(self, entry: CompressedContext, hashes: list[bytes]) -> int:
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self.entries[entry_id] = entry
        self.entry_hashes[entry_id] = hashes
        for h in hashes:
            self.index.setdefault(h, {})[entry_id] = None
        self.stats.inserted += 1
        self.stats.bytes += entry.nbytes
        self.stats.entries = len(self.entries)
        return entry_id

    def _evict(self, entry_id: int) -> None:
        """Drop an entry; a sequence that already took its KV keeps its own view of the tensors."""
        entry = self.entries.pop(entry_id)
        for h in self.entry_hashes.pop(entry_id):
            holders = self.index[h]
            holders.pop(entry_id, None)
            if not holders:
                del self.index[h]
        key = self.compressed_key_of.pop(entry_id, None)
        if key is not None:
            del self.compressed[key]
            self.stats.compressed_entries -= 1
        self.stats.evicted += 1
        self.stats.bytes -= entry.nbytes
        self.stats.entries = len(self.entries)


def head(ctx: CompressedContext, n: int, copy: bool = False) -> CompressedContext:
    """The first `n` tokens of an in-order context (views unless `copy`)."""
    take = (lambda t: t[:, :n].clone()) if copy else (lambda t: t[:, :n])
    return replace(
        ctx,
        n_context_tokens=n,
        next_pos=n,
        written=n,
        fill=n,
        keys=[take(k) for k in ctx.keys],
        values=[take(v) for v in ctx.values],
        positions=[take(p) for p in ctx.positions],
    )
