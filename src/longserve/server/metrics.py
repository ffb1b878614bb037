"""Prometheus metrics, one `CollectorRegistry` per app so several servers (tests) never share series.

The engine thread records tokens and finishes as they happen; gauges are refreshed after every step.
Speculative decoding (`--draft`) adds `longserve_spec_*` series (draft tokens proposed / accepted, verify
rounds, accepted length per request, its own queue gauges); speculative prefill (`--prefill-draft`)
adds `longserve_spec_prefill_*` token counters.

Next to longserve's own series, the same events are exported under vLLM's names (`vllm:*`, labelled
`model_name`), so dashboards and alerts written for vLLM work against longserve unchanged.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RATIO_BUCKETS = (1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
_ACCEPTED_BUCKETS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class VLLMSeries:
    """vLLM's request series (names, labels and meaning as vLLM exports them), fed by `Metrics`."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        r, label = registry, ["model_name"]

        def one(kind, name: str, doc: str, **kw):
            return kind(f"vllm:{name}", doc, label, registry=r, **kw).labels(model_name)

        def hist(name: str, doc: str, buckets) -> Histogram:
            return one(Histogram, name, doc, buckets=buckets)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Inter-token latency", _ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency", _LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Time spent waiting for a slot", _LATENCY_BUCKETS)
        self.prefill = hist("request_prefill_time_seconds", "Time spent in prefill", _LATENCY_BUCKETS)
        self.decode = hist("request_decode_time_seconds", "Time spent in decode", _LATENCY_BUCKETS)
        self.prompt_hist = hist("request_prompt_tokens", "Prompt tokens per request", _TOKEN_BUCKETS)
        self.generation_hist = hist(
            "request_generation_tokens", "Generated tokens per request", _TOKEN_BUCKETS
        )
        self.prompt_tokens = one(Counter, "prompt_tokens", "Prefilled tokens")
        self.generation_tokens = one(Counter, "generation_tokens", "Generated tokens")
        self.running = one(Gauge, "num_requests_running", "Running requests")
        self.waiting = one(Gauge, "num_requests_waiting", "Waiting requests")
        self.kv_usage = one(Gauge, "kv_cache_usage_perc", "KV cache usage (1 = full)")
        self._success = Counter(
            "vllm:request_success", "Finished requests", ["model_name", "finished_reason"], registry=r
        )
        self.model_name = model_name

    def success(self, reason: str):
        return self._success.labels(self.model_name, reason)


class Metrics:
    def __init__(self, prefix: str = "longserve", model_name: str = "longserve") -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, prefix
        self.vllm = VLLMSeries(r, model_name)
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{p}_inter_token_latency_seconds",
            "Time between consecutive tokens of a request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{p}_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.compression = Histogram(
            f"{p}_kv_compression_ratio",
            "Tokens seen / KV tokens held per finished request",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            f"{p}_request_queue_time_seconds",
            "Arrival to taking a KV slot",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill_time = Histogram(
            f"{p}_request_prefill_time_seconds",
            "Taking a KV slot to the first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_time = Histogram(
            f"{p}_request_decode_time_seconds", "First to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens_hist = Histogram(
            f"{p}_request_prompt_tokens", "Prompt tokens per request", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.generation_tokens_hist = Histogram(
            f"{p}_request_generation_tokens",
            "Generated tokens per finished request",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.running = Gauge(f"{p}_num_requests_running", "Requests holding a KV slot", registry=r)
        self.waiting = Gauge(f"{p}_num_requests_waiting", "Requests waiting for a KV slot", registry=r)
        self.kv_usage = Gauge(f"{p}_kv_cache_usage", "Fraction of KV slots in use", registry=r)
        self.kv_bytes = Gauge(f"{p}_kv_cache_bytes_in_use", "K/V bytes held by running sequences", registry=r)
        self.kv_slots = Gauge(f"{p}_kv_cache_slots", "KV slots in the pool", registry=r)
        self.kv_pool_bytes = Gauge(f"{p}_kv_cache_pool_bytes", "Bytes the KV pool occupies", registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(
            f"{p}_requests", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        # speculative decoding (server started with --draft)
        self.spec_draft_tokens = Counter(
            f"{p}_spec_draft_tokens", "Draft tokens proposed for verification", registry=r
        )
        self.spec_accepted_tokens = Counter(
            f"{p}_spec_accepted_tokens", "Draft tokens the target accepted", registry=r
        )
        self.spec_verify_rounds = Counter(
            f"{p}_spec_verify_rounds", "Target verification forwards with drafts", registry=r
        )
        self.spec_accepted_length = Histogram(
            f"{p}_spec_mean_accepted_length",
            "Per request: accepted draft tokens per verify round",
            buckets=_ACCEPTED_BUCKETS,
            registry=r,
        )
        self.spec_running = Gauge(
            f"{p}_spec_num_requests_running",
            "Requests being decoded speculatively (batch 1: 0 or 1)",
            registry=r,
        )
        self.spec_waiting = Gauge(
            f"{p}_spec_num_requests_waiting", "Requests queued for the speculative decoder", registry=r
        )
        # speculative prefill (server started with --prefill-draft)
        self.spec_prefill_requests = Counter(
            f"{p}_spec_prefill_requests", "Prompts pruned by the prefill draft", registry=r
        )
        self.spec_prefill_original_tokens = Counter(
            f"{p}_spec_prefill_original_tokens", "Prompt tokens before speculative prefill", registry=r
        )
        self.spec_prefill_kept_tokens = Counter(
            f"{p}_spec_prefill_kept_tokens",
            "Prompt tokens the target prefilled after speculative prefill",
            registry=r,
        )

    # ---- recording: every event feeds longserve's series and vLLM's ----------------------------
    def admitted(self, queue_s: float) -> None:
        self.queue_time.observe(queue_s)
        self.vllm.queue.observe(queue_s)

    def first_token(self, ttft_s: float, prefill_s: float | None, prompt_tokens: int) -> None:
        for ttft, prompt in ((self.ttft, self.prompt_tokens), (self.vllm.ttft, self.vllm.prompt_tokens)):
            ttft.observe(ttft_s)
            prompt.inc(prompt_tokens)
        if prefill_s is not None:
            self.prefill_time.observe(prefill_s)
            self.vllm.prefill.observe(prefill_s)

    def token(self, itl_s: float | None) -> None:
        self.generation_tokens.inc()
        self.vllm.generation_tokens.inc()
        if itl_s is not None:
            self.itl.observe(itl_s)
            self.vllm.itl.observe(itl_s)

    def finished(self, e2e_s: float, decode_s: float, stats: dict) -> None:
        pairs = (
            (self.e2e, self.vllm.e2e, e2e_s),
            (self.decode_time, self.vllm.decode, decode_s),
            (self.prompt_tokens_hist, self.vllm.prompt_hist, stats["prompt_tokens"]),
            (self.generation_tokens_hist, self.vllm.generation_hist, stats["completion_tokens"]),
        )
        for ours, theirs, value in pairs:
            ours.observe(value)
            theirs.observe(value)
        self.compression.observe(stats["compression_ratio"])
        self.ended(stats["finish_reason"] or "unknown")

    def ended(self, reason: str) -> None:
        """A request left the server: finished (stop/length), aborted or failed."""
        self.requests.labels(reason).inc()
        self.vllm.success(reason).inc()

    def load(self, running: int, waiting: int, kv_usage: float) -> None:
        for series in (self, self.vllm):
            series.running.set(running)
            series.waiting.set(waiting)
            series.kv_usage.set(kv_usage)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
