"""Prometheus metrics, vLLM's names under ``flashdecode:``, in one registry per app.

Gauges and token counters are read from ``LLMEngine.stats()`` when ``/metrics`` is scraped, so they
are never out of step with the engine; latencies are observed from each finished request's
``RequestMetrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ...outputs import RequestOutput
from ..async_engine import AsyncLLMEngine

# vLLM's buckets, so dashboards built for it read these unchanged
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)  # fmt: skip


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.engine = engine
        self.labels = [model_name]

    def describe(self):
        return []  # collected fresh at every scrape; nothing to check at registration

    def collect(self):
        s = self.engine.stats()
        usage = 1.0 - s.kv_blocks_free / s.kv_blocks_total if s.kv_blocks_total else 0.0
        gauges = [
            ("num_requests_running", "Sequences in the running batch.", s.num_running),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", usage),
            ("spec_decode_draft_acceptance_rate", "Drafts accepted per draft.", s.spec_acceptance_rate),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(f"flashdecode:{name}", doc, labels=["model_name"])
            family.add_metric(self.labels, value)
            yield family
        counters = [
            ("prompt_tokens", "Prompt tokens of every request added.", s.prompt_tokens),
            ("generation_tokens", "Tokens generated.", s.generation_tokens),
            ("prefix_cache_queries", "KV blocks looked up in the prefix cache.", s.prefix_cache_queries),
            ("prefix_cache_hits", "KV blocks found in the prefix cache.", s.prefix_cache_hits),
            ("num_preemptions", "Sequences preempted for lack of KV blocks.", s.num_preemptions),
            ("spec_decode_num_draft_tokens", "Tokens drafted (speculation).", s.spec_num_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Drafted tokens accepted.", s.spec_num_accepted_tokens),
        ]
        for name, doc, value in counters:
            family = CounterMetricFamily(f"flashdecode:{name}", doc, labels=["model_name"])
            family.add_metric(self.labels, value)
            yield family


class ServerMetrics:
    """The app's registry: engine state at scrape time plus per-request latencies."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_name = model_name
        self.registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.ttft = Histogram(
            "flashdecode:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "flashdecode:e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "flashdecode:time_per_output_token_seconds",
            "Mean time between output tokens of a request.",
            labels,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.success = Counter(
            "flashdecode:request_success",
            "Requests finished, by the first choice's finish reason.",
            labels + ["finished_reason"],
            registry=self.registry,
        )

        # children made now, so every series is in /metrics (at zero) before the first request
        self._ttft, self._e2e, self._tpot = (h.labels(model_name) for h in (self.ttft, self.e2e, self.tpot))

    def observe(self, out: RequestOutput) -> None:
        """Record a finished engine request (one per prompt)."""
        m = out.metrics
        if m is None:
            return
        if m.time_to_first_token is not None:
            self._ttft.observe(m.time_to_first_token)
        if m.finished_time is not None:
            self._e2e.observe(m.finished_time - m.arrival_time)
        if m.time_per_output_token is not None:
            self._tpot.observe(m.time_per_output_token)
        reason = out.outputs[0].finish_reason if out.outputs else None
        self.success.labels(self.model_name, reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
