"""Giving a parked model's memory back to the kernel, and reading what the process holds."""

from __future__ import annotations

import ctypes
import functools
import gc
import os


def release_memory(collect: bool = True) -> None:
    """Free a dropped model's memory for real, so RSS drops: collect the reference cycles that still
    hold its tensors (``collect``; a full collection costs most of a second in a process with a few
    tokenizers loaded, so callers that know nothing is left skip it), then hand freed heap back to the
    kernel. glibc keeps freed chunks below its (dynamic, up to 32 MiB) mmap threshold in the heap;
    `malloc_trim` returns them. Without glibc, only the collection."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def rss_bytes() -> int:
    """The process's resident set now (anonymous + mapped file pages), from /proc; 0 where unreadable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def mapped_rss_bytes(suffix: str = ".flat") -> int:
    """Resident bytes of this process's mappings of files whose name ends with ``suffix`` (the mapped
    weights of attached experts), from /proc/self/smaps; 0 where unreadable. RSS minus this is what the
    process holds besides those weights (runtime, tokenizers, caches, allocator slack)."""
    total, counting = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's header line
                    counting = line.rstrip().removesuffix(" (deleted)").endswith(suffix)
                elif counting and first == "Rss:":
                    total += int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        return 0
    return total
