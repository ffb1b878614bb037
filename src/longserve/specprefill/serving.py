"""Server glue: the per-request `spec_prefill` body field and one draft shared by all requests.

`"spec_prefill"` absent, null or true: the server's default (on when it was started with a prefill
draft); false or {"enabled": false}: off; {"keep": 0.1}: another keep rate; {"draft": NAME} must name the
loaded draft (drafts are never loaded per request).
"""

from __future__ import annotations

import asyncio
from typing import Any

from longserve.errors import InvalidParameterError
from longserve.llm import LLM
from longserve.specprefill.compress import CompressedPrompt, Prompt, SpeculativePrefill


def parse_option(raw: Any, draft_name: str | None) -> tuple[bool, float | None]:
    """(enabled, keep or None for the default) from a request's `spec_prefill` value."""
    if raw is None or raw is True:
        return draft_name is not None, None
    if raw is False:
        return False, None
    if not isinstance(raw, dict):
        raise InvalidParameterError('spec_prefill must be true, false or an object like {"keep": 0.25}')
    unknown = set(raw) - {"enabled", "keep", "draft"}
    if unknown:
        raise InvalidParameterError(f"unknown spec_prefill field(s): {', '.join(sorted(unknown))}")
    if raw.get("enabled", True) is False:
        return False, None
    if draft_name is None:
        raise InvalidParameterError(
            "spec_prefill was requested but this server has no prefill draft "
            "(start it with --prefill-draft MODEL)"
        )
    draft = raw.get("draft")
    if draft is not None and draft != draft_name:
        raise InvalidParameterError(
            f"spec_prefill.draft {draft!r} is not loaded; this server's prefill draft is {draft_name!r}"
        )
    keep = raw.get("keep")
    if keep is not None and (
        isinstance(keep, bool) or not isinstance(keep, int | float) or not 0 < keep <= 1
    ):
        raise InvalidParameterError(f"spec_prefill.keep must be in (0, 1], got {keep!r}")
    return True, None if keep is None else float(keep)


class ServerPrefill:
    """One `SpeculativePrefill` for a server: drafts run one at a time, off the event loop."""

    def __init__(self, sp: SpeculativePrefill | None):
        self.sp = sp
        self._lock = asyncio.Lock()

    @property
    def draft_name(self) -> str | None:
        return self.sp.draft.loaded.name if self.sp is not None else None

    async def compress(self, target: LLM, prompt: Prompt | list[int], raw: Any) -> CompressedPrompt | None:
        """The ids (+ positions) to submit, or None when this request is not compressed. Raises
        `InvalidParameterError` (HTTP 400) for a bad `spec_prefill` value."""
        enabled, keep = parse_option(raw, self.draft_name)
        if not enabled:
            return None
        async with self._lock:
            return await asyncio.to_thread(self.sp.compress_for_engine, target, prompt, keep)
