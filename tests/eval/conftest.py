"""Shared fixtures for the eval harness tests: a whitespace token counter and scriptable fake targets."""

from __future__ import annotations

import pytest

from longserve.eval.target import EvalRequest, EvalResult


def ws_tokens(text: str) -> int:
    return len(text.split())


class FakeTarget:
    """Answers from a prompt -> text table (or echoes nothing); can fail after `fail_after` requests."""

    def __init__(
        self, name: str, table: dict[str, str] | None = None, fail_after: int | None = None, kv: int = 0
    ):
        self.name, self.table, self.fail_after, self.kv = name, table or {}, fail_after, kv
        self.seen: list[EvalRequest] = []

    def count_tokens(self, text: str) -> int:
        return ws_tokens(text)

    def answer(self, requests: list[EvalRequest]) -> list[EvalResult]:
        if self.fail_after is not None and len(self.seen) + len(requests) > self.fail_after:
            raise RuntimeError("simulated crash")
        self.seen += requests
        out = []
        for r in requests:
            n = ws_tokens(r.context + r.question)
            text = self.table.get(r.context + r.question, "I do not know.")
            out.append(
                EvalResult(text, n, ttft_s=n * 1e-5, decode_tok_s=50.0, kv_bytes=self.kv * n, extra={})
            )
        return out


@pytest.fixture
def count_tokens():
    return ws_tokens


@pytest.fixture
def fake_target():
    return FakeTarget
