"""One meaning for size suffixes across the toolkit: `k` is 1024 (so `4k` tokens = 4096, matching the
committed eval lengths 2048/4096/8192), `m` is 1024**2.

Used by the eval CLI (`--lengths 4k`, budgets `snapkv@2k`) and the server's `--max-kv-memory`
(`64ktok`, and bare `4k`/`2m`/`1g` bytes). Explicit byte units keep their standard meaning there:
`kb`/`mb` are powers of 1000, `kib`/`mib` powers of 1024.
"""

from __future__ import annotations

#: Binary multipliers of the bare suffixes (case-insensitive).
SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_count(text: str) -> int:
    """ "4096" -> 4096, "4k" -> 4096, "1.5k" -> 1536, "2m" -> 2097152 (a suffixed value is truncated to a
    whole count); raises ValueError otherwise, so each caller words its own error message."""
    text = text.strip()
    if text[-1:].isalpha():
        scale = SUFFIXES.get(text[-1].lower())
        if scale is None:
            raise ValueError(f"unknown size suffix in {text!r}")
        try:
            return int(float(text[:-1]) * scale)
        except OverflowError:  # "infk"
            raise ValueError(f"{text!r} is not a finite count") from None
    return int(text)


def human_bytes(n: float) -> str:
    """`1536` -> `1.5 KiB`: sizes in messages and startup lines (binary units, as the flags take)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
