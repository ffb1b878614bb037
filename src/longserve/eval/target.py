"""What the harness evaluates: anything that answers `EvalRequest`s (the local engine, a remote endpoint).

Keeping this protocol tiny lets the runner, the tasks and the reports stay independent of the engine.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import httpx

from longserve.errors import LongserveError

Setting = Literal["query_aware", "query_agnostic"]
SETTINGS: tuple[str, ...] = ("query_aware", "query_agnostic")


@dataclass
class EvalRequest:
    """One sample to answer. The prompt is `context + question`.

    `setting`: "query_aware" compresses the KV cache of the whole prompt (the question is visible to the
    compression policy); "query_agnostic" compresses the context first and appends the question afterwards,
    as when a cached document is reused for many questions.
    """

    context: str
    question: str
    max_new_tokens: int
    setting: str = "query_aware"
    #: send `context + question` as raw text, without a chat template (LongBench's few-shot/completion tasks)
    raw_prompt: bool = False


@dataclass
class EvalResult:
    text: str
    prompt_tokens: int
    ttft_s: float
    decode_tok_s: float
    kv_bytes: int = 0  # peak KV-cache bytes, 0 if unknown
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Target(Protocol):
    name: str

    def count_tokens(self, text: str) -> int: ...

    def answer(self, requests: list[EvalRequest]) -> list[EvalResult]: ...


class EndpointError(LongserveError):
    """A remote endpoint failed or kept failing; the message names its URL."""

    status_code = 502
    error_type = "api_error"


def estimate_tokens(text: str) -> int:
    """~4 characters per token: the usual rule of thumb for English BPE vocabularies (code and non-English
    text have more tokens per character, so this undercounts them)."""
    return (len(text) + 3) // 4


class _Retry(Exception):
    pass


class OpenAITarget:
    """Any OpenAI-compatible chat-completions endpoint, queried concurrently with retries.

    `endpoint` is a base URL (`http://host:8000` or `http://host:8000/v1`) or the full
    `.../chat/completions` URL. Streaming is used so TTFT and decode speed can be measured; with
    `stream=False`, `ttft_s` is the whole request latency and `decode_tok_s` is 0. Remote engines cannot
    separate the question from the compressed context, so "query_agnostic" requests are sent like
    "query_aware" ones and only recorded as such (`extra["setting_applied"] = False`).
    `tokenizer`: anything with `encode(text) -> list` (e.g. a Hugging Face tokenizer) for exact counts;
    without it, `count_tokens` is the `estimate_tokens` heuristic.
    """

    def __init__(
        self,
        endpoint: str,
        model: str | None = None,
        *,
        name: str | None = None,
        api_key: str | None = None,
        tokenizer: Any = None,
        concurrency: int = 4,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        timeout_s: float = 600.0,
        temperature: float = 0.0,
        stream: bool = True,
    ):
        base = endpoint.rstrip("/")
        if base.endswith("/chat/completions"):
            self.url = base
        else:
            self.url = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self.model, self.name = model, name or model or "endpoint"
        self.tokenizer, self.concurrency, self.max_retries = tokenizer, max(1, concurrency), max_retries
        self.backoff_s, self.temperature, self.stream = backoff_s, temperature, stream
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)
        self._model_lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAITarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return estimate_tokens(text)
        try:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return len(self.tokenizer.encode(text))

    def answer(self, requests: list[EvalRequest]) -> list[EvalResult]:
        if len(requests) <= 1 or self.concurrency == 1:
            return [self._answer_one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._answer_one, requests))

    def _model_name(self) -> str:
        """The configured model, else the endpoint's first listed model, else "default"."""
        with self._model_lock:
            if self.model is None:
                try:
                    r = self._client.get(self.url.removesuffix("/chat/completions") + "/models", timeout=10)
                    self.model = r.json()["data"][0]["id"]
                except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                    self.model = "default"
            return self.model

    def _answer_one(self, request: EvalRequest) -> EvalResult:
        delay, last = self.backoff_s, ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            try:
                return self._post(request)
            except httpx.RequestError as e:
                last = f"{type(e).__name__}: {e}"
            except _Retry as e:
                last = str(e)
        raise EndpointError(f"{self.url} failed after {self.max_retries + 1} attempts; last error: {last}")

    def _post(self, request: EvalRequest) -> EvalResult:
        prompt = request.context + request.question
        payload: dict[str, Any] = {
            "model": self._model_name(),
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": request.max_new_tokens,
            "temperature": self.temperature,
            "stream": self.stream,
        }
        if self.stream:
            payload["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        first = None
        pieces: list[str] = []
        usage: dict[str, Any] = {}
        finish = None
        with self._client.stream("POST", self.url, json=payload) as r:
            if r.status_code >= 500 or r.status_code == 429:
                raise _Retry(f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:200]}")
            if r.status_code >= 400:
                body = r.read().decode(errors="replace")[:500]
                raise EndpointError(f"{self.url} rejected the request (HTTP {r.status_code}): {body}")
            try:
                if self.stream:
                    for line in r.iter_lines():
                        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                            continue
                        chunk = json.loads(line[5:])
                        usage = chunk.get("usage") or usage
                        for choice in chunk.get("choices") or []:
                            delta = (choice.get("delta") or {}).get("content") or ""
                            if delta and first is None:
                                first = time.perf_counter()
                            pieces.append(delta)
                            finish = choice.get("finish_reason") or finish
                else:
                    body = json.loads(r.read())
                    usage = body.get("usage") or {}
                    choice = body["choices"][0]
                    pieces.append(choice["message"].get("content") or "")
                    finish = choice.get("finish_reason")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise _Retry(f"malformed response: {e}") from e
        end = time.perf_counter()
        text = "".join(pieces)
        completion = int(usage.get("completion_tokens") or self.count_tokens(text))
        streamed = self.stream and first is not None
        decode_s = end - first if streamed else 0.0
        return EvalResult(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or self.count_tokens(prompt)),
            ttft_s=(first if streamed else end) - start,
            decode_tok_s=(completion - 1) / decode_s if streamed and decode_s > 0 and completion > 1 else 0.0,
            kv_bytes=0,
            extra={
                "setting": request.setting,
                "setting_applied": False,
                "completion_tokens": completion,
                "finish_reason": finish,
                "latency_s": end - start,
            },
        )
