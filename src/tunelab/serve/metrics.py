"""`GET /metrics`: Prometheus text, from prometheus_client (its own registry per server, so tests can run many).

    tunelab_requests_total{model, finish}           requests ended: stop, length, error
    tunelab_requests_rejected_total                 429s (full queue)
    tunelab_prompt_tokens_total, tunelab_generation_tokens_total
    tunelab_queue_depth, tunelab_running_rows       now
    tunelab_adapter_slots_loaded, tunelab_adapter_loads_total
    tunelab_batch_rows                              rows in each decode step (histogram)
    tunelab_time_to_first_token_seconds, tunelab_inter_token_seconds, tunelab_request_seconds   (histograms)

The engine's numbers (steps, batch sizes, queue) are read from its stats when scraped, so the engine
thread never touches a Prometheus object.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from tunelab.serve.engine import Engine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tunelab_requests", "Requests ended, by model name and finish reason",
                                ["model", "finish"], registry=self.registry)
        self.rejected = Counter("tunelab_requests_rejected", "Requests refused with 429: the queue was full",
                                registry=self.registry)
        self.ttft = Histogram("tunelab_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("tunelab_inter_token_seconds", "Between two tokens of one answer",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("tunelab_request_seconds", "From arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def request_timer(self, model: str) -> RequestTimer:
        return RequestTimer(self, model)


class RequestTimer:
    """Times one request's tokens as the HTTP side receives them."""

    def __init__(self, metrics: ServeMetrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.started = self.last = time.monotonic()
        self.count = 0

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        (self.metrics.ttft if self.count == 0 else self.metrics.itl).observe(now - self.last)
        self.last, self.count = now, self.count + n

    def done(self, finish: str) -> None:
        self.metrics.requests.labels(self.model, finish).inc()
        self.metrics.latency.observe(time.monotonic() - self.started)


class _EngineCollector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        engine, stats = self.engine, self.engine.stats
        yield CounterMetricFamily("tunelab_prompt_tokens", "Prompt tokens computed", value=stats.prompt_tokens)
        yield CounterMetricFamily("tunelab_generation_tokens", "Tokens generated", value=stats.generated_tokens)
        yield CounterMetricFamily("tunelab_engine_steps", "Decode steps run", value=stats.steps)
        yield GaugeMetricFamily("tunelab_queue_depth", "Requests waiting for a batch row", value=engine.waiting())
        yield GaugeMetricFamily("tunelab_running_rows", "Requests in the batch", value=engine.running())
        yield GaugeMetricFamily("tunelab_adapter_slots_loaded", "Adapters held in slots", value=engine.slots.loaded())
        yield GaugeMetricFamily("tunelab_adapter_slots", "Adapter slots (max_adapters)", value=engine.slots.capacity)
        yield CounterMetricFamily("tunelab_adapter_loads", "Adapters read from disk into a slot",
                                  value=engine.slots.loads)
        counts = dict(stats.batch_rows)  # a copy: the engine thread may add to it meanwhile
        buckets, running = [], 0
        for bound in BATCH_BUCKETS:
            running = sum(c for rows, c in counts.items() if rows <= bound)
            buckets.append((str(bound), running))
        buckets.append(("+Inf", sum(counts.values())))
        yield HistogramMetricFamily("tunelab_batch_rows", "Rows in each decode step", buckets=buckets,
                                    sum_value=sum(rows * c for rows, c in counts.items()))
