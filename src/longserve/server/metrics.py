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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RATIO_BUCKETS = (1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
_ACCEPTED_BUCKETS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class Both:
    """One event recorded under longserve's series and vLLM's (labelled `model_name`)."""

    def __init__(self, *series) -> None:
        self.series = series

    def observe(self, value: float) -> None:
        for s in self.series:
            s.observe(value)

    def inc(self, value: float = 1) -> None:
        for s in self.series:
            s.inc(value)

    def set(self, value: float) -> None:
        for s in self.series:
            s.set(value)


class Metrics:
    def __init__(self, prefix: str = "longserve", model_name: str = "longserve") -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, prefix
        self.prefix = prefix

        def both(kind, name: str, doc: str, vllm_name: str | None = None, **kw) -> Both:
            ours = kind(f"{p}_{name}", doc, registry=r, **kw)
            theirs = kind(f"vllm:{vllm_name or name}", doc, ["model_name"], registry=r, **kw)
            return Both(ours, theirs.labels(model_name))

        def hist(name: str, doc: str, buckets=_LATENCY_BUCKETS) -> Both:
            return both(Histogram, name, doc, buckets=buckets)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first generated token")
        self.itl = hist(
            "inter_token_latency_seconds", "Time between consecutive tokens of a request", _ITL_BUCKETS
        )
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token")
        self.queue_time = hist("request_queue_time_seconds", "Arrival to taking a KV slot")
        self.prefill_time = hist("request_prefill_time_seconds", "Taking a KV slot to the first token")
        self.decode_time = hist("request_decode_time_seconds", "First to last token")
        self.prompt_tokens_hist = hist("request_prompt_tokens", "Prompt tokens per request", _TOKEN_BUCKETS)
        self.generation_tokens_hist = hist(
            "request_generation_tokens", "Tokens generated per finished request", _TOKEN_BUCKETS
        )
        self.compression = Histogram(
            f"{p}_kv_compression_ratio",
            "Tokens seen / KV tokens held per finished request",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.running = both(
            Gauge, "num_requests_running", "num_requests_running", "Requests holding a KV slot"
        )
        self.waiting = both(
            Gauge, "num_requests_waiting", "num_requests_waiting", "Requests waiting for a slot"
        )
        self.kv_usage = both(Gauge, "kv_cache_usage", "kv_cache_usage_perc", "Fraction of KV slots in use")
        self.kv_bytes = Gauge(f"{p}_kv_cache_bytes_in_use", "K/V bytes held by running sequences", registry=r)
        self.kv_slots = Gauge(f"{p}_kv_cache_slots", "KV slots in the pool", registry=r)
        self.kv_pool_bytes = Gauge(f"{p}_kv_cache_pool_bytes", "Bytes the KV pool occupies", registry=r)
        self.prompt_tokens = both(Counter, "prompt_tokens", "Prompt tokens prefilled")
        self.generation_tokens = both(Counter, "generation_tokens", "Tokens generated")
        self.requests = Counter(
            f"{p}_requests", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        self.vllm_success = Counter(
            "vllm:request_success", "Finished requests", ["model_name", "finished_reason"], registry=r
        )
        self.model_name = model_name
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

    # ---- recording ------------------------------------------------------------------------------
    def admitted(self, queue_s: float) -> None:
        self.queue_time.observe(queue_s)

    def first_token(self, ttft_s: float, prefill_s: float | None, prompt_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        self.prompt_tokens.inc(prompt_tokens)
        if prefill_s is not None:
            self.prefill_time.observe(prefill_s)

    def token(self, itl_s: float | None) -> None:
        self.generation_tokens.inc()
        if itl_s is not None:
            self.itl.observe(itl_s)

    def finished(self, e2e_s: float, decode_s: float, stats: dict) -> None:
        self.e2e.observe(e2e_s)
        self.decode_time.observe(decode_s)
        self.prompt_tokens_hist.observe(stats["prompt_tokens"])
        self.generation_tokens_hist.observe(stats["completion_tokens"])
        self.compression.observe(stats["compression_ratio"])
        self.ended(stats["finish_reason"] or "unknown")

    def ended(self, reason: str) -> None:
        """A request left the server: finished (stop/length), aborted or failed."""
        self.requests.labels(reason).inc()
        self.vllm_success.labels(self.model_name, reason).inc()

    def load(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def watch_prefix_cache(self, cache) -> None:
        """Export the prefix cache's counters (read at scrape time)."""
        self.registry.register(PrefixCacheCollector(cache, self.prefix))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class PrefixCacheCollector:
    """The prefix cache's statistics as Prometheus series: hits, hit tokens, bytes, entries."""

    def __init__(self, cache, prefix: str) -> None:
        self.cache, self.prefix = cache, prefix

    def collect(self):
        s, p = self.cache.stats, f"{self.prefix}_prefix_cache"
        yield CounterMetricFamily(f"{p}_hits", "Requests that reused a cached prefix", value=s.hits)
        yield CounterMetricFamily(f"{p}_misses", "Cacheable requests with no cached prefix", value=s.misses)
        yield CounterMetricFamily(
            f"{p}_hit_tokens", "Prompt tokens served from the cache", value=s.hit_tokens
        )
        yield CounterMetricFamily(f"{p}_evictions", "Entries evicted under the byte budget", value=s.evicted)
        yield GaugeMetricFamily(f"{p}_bytes", "K/V bytes the cache holds", value=s.bytes)
        yield GaugeMetricFamily(f"{p}_entries", "Cached prompts", value=s.entries)
        yield GaugeMetricFamily(
            f"{p}_compressed_entries", "Entries holding a compressed prefix", value=s.compressed_entries
        )
        yield CounterMetricFamily(
            f"{p}_compressed_hits",
            "Requests that attached a cached compressed prefix",
            value=s.compressed_hits,
        )
        yield GaugeMetricFamily(f"{p}_max_bytes", "The cache's byte budget", value=self.cache.max_bytes)


_SWITCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class MultiModelMetrics:
    """/metrics of a several-model server: every expert's own series (its `Metrics`, kept across parks
    so counters never reset), each sample labelled `model_name`, and the tiers' series: resident models,
    switches, switch seconds, weight bytes per tier."""

    def __init__(self, per_model: dict[str, Metrics], prefix: str = "longserve") -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, f"{prefix}_coe"
        r.register(_Relabelled(per_model))
        self.resident = Gauge(f"{p}_resident_models", "Experts resident (tier 0)", registry=r)
        self.tier = Gauge(
            f"{p}_model_tier",
            "Tier of each expert: 0 resident, 1 parked, 2 on disk",
            ["model_name"],
            registry=r,
        )
        self.switches = Counter(
            f"{p}_switches", "Experts made resident", ["model_name", "from_tier"], registry=r
        )
        self.switch_seconds = Histogram(
            f"{p}_switch_seconds",
            "Seconds to make an expert resident (parking others included)",
            ["from_tier"],
            buckets=_SWITCH_BUCKETS,
            registry=r,
        )
        self.weight_bytes = Gauge(
            f"{p}_weight_bytes", "Weight bytes of the experts per tier", ["tier"], registry=r
        )
        self.max_weight_bytes = Gauge(f"{p}_max_weight_bytes", "The weight budget", registry=r)
        self.waiting = Gauge(
            f"{p}_requests_waiting_for_switch",
            "Requests waiting for their expert",
            ["model_name"],
            registry=r,
        )

    def switched(self, expert: str, from_tier: int, seconds: float) -> None:
        self.switches.labels(expert, str(from_tier)).inc()
        self.switch_seconds.labels(str(from_tier)).observe(seconds)

    def refresh(self, registry) -> None:
        """Gauges from the registry's state (after every switch, and at each scrape)."""
        by_tier = dict.fromkeys((0, 1, 2), 0)
        for name in registry.experts:
            tier = registry.tier(name)
            self.tier.labels(name).set(tier)
            profile = registry.profiles.get(name)
            by_tier[tier] += profile.size if profile is not None else 0
            self.waiting.labels(name).set(registry.waiting[name])
        for tier, size in by_tier.items():
            self.weight_bytes.labels(str(tier)).set(size)
        self.resident.set(len(registry.residents))
        self.max_weight_bytes.set(registry.budget or 0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Relabelled:
    """Each expert's series merged into one family per name, every sample labelled with its expert
    (the vLLM-named ones already carry `model_name`)."""

    def __init__(self, per_model: dict[str, Metrics]) -> None:
        self.per_model = per_model

    def collect(self):
        families: dict[str, Metric] = {}
        for name, metrics in self.per_model.items():
            for family in metrics.registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                for s in family.samples:
                    labels = s.labels if "model_name" in s.labels else {"model_name": name, **s.labels}
                    fields = list(s)  # a Sample namedtuple: name, labels, value, ...
                    fields[1] = labels
                    merged.samples.append(type(s)(*fields))
        yield from families.values()
