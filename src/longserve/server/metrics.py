"""Prometheus metrics, one `CollectorRegistry` per app so several servers (tests) never share series.

The engine thread records tokens and finishes as they happen; gauges are refreshed after every step.
Speculative decoding (`--draft`) adds `longserve_spec_*` series (draft tokens proposed / accepted, verify
rounds, accepted length per request, its own queue gauges); speculative prefill (`--prefill-draft`)
adds `longserve_spec_prefill_*` token counters.
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


class Metrics:
    def __init__(self, prefix: str = "longserve") -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, prefix
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

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
