"""The Prometheus metrics the pipeline records. Every name starts with ``orchestrator_``.

Recorded where the event happens (gateway or Celery worker process). With
``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client keeps the values in files
that ``orchestrator_site.metrics`` aggregates across the processes of a host.

Gauges whose truth lives in Redis or the broker (circuit-breaker state, queue
depth, requests in flight) and the derived dedup hit ratio are not here: they
are computed when scraped, in ``orchestrator_site.metrics``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from django.conf import settings
from prometheus_client import Counter, Gauge, Histogram

from workers.types import Usage

# From half a millisecond (an in-memory stage) to a minute (a long generation).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

STAGE_DURATION = Histogram(
    "orchestrator_stage_duration_seconds",
    "Time spent in one pipeline stage.",
    ["stage", "outcome"],
    buckets=LATENCY_BUCKETS,
)
WORKER_LATENCY = Histogram(
    "orchestrator_worker_latency_seconds",
    "Time of one model-worker call, retries included.",
    ["worker", "outcome"],
    buckets=LATENCY_BUCKETS,
)
WORKER_RETRIES = Histogram(
    "orchestrator_worker_retries",
    "Retries one model-worker call needed (0: the first attempt answered).",
    ["worker"],
    buckets=(0, 1, 2, 3, 5, 8),
)
PIPELINE_REQUESTS = Counter(
    "orchestrator_pipeline_requests",
    "Real-time requests run by a Celery worker, by outcome (ok or the error code).",
    ["worker", "outcome"],
)
DEDUP_REQUESTS = Counter(
    "orchestrator_dedup_requests",
    "Requests checked against the deduplication window: hit (answered by an identical request) or miss.",
    ["outcome"],
)
REQUESTS_SHED = Counter(
    "orchestrator_requests_shed",
    "Real-time requests refused with 503 because the queue was full, by scope (tenant or global).",
    ["scope"],
)
RATE_LIMITED = Counter(
    "orchestrator_rate_limited",
    "Requests refused with 429 by a tenant's rate limit, by kind.",
    ["kind"],
)
TTFT = Histogram(
    "orchestrator_ttft_seconds",
    "Time from the gateway accepting a request to its first token on the token bus.",
    ["worker"],
    buckets=LATENCY_BUCKETS,
)
STREAM_DURATION = Histogram(
    "orchestrator_stream_duration_seconds",
    "Time from a request's first token to the end of its stream.",
    ["worker", "outcome"],
    buckets=LATENCY_BUCKETS,
)
STREAM_TOKENS = Counter(
    "orchestrator_stream_tokens",
    "Token chunks published to the token bus.",
    ["worker"],
)
TENANT_TOKENS = Counter(
    "orchestrator_tenant_tokens",
    "Provider tokens by tenant (the METRICS_TENANT_LABELS tenants with the most, the rest as other), worker and direction (input, output).",
    ["tenant", "worker", "direction"],
)
SPEND = Counter(
    "orchestrator_spend_usd",
    "What answers cost at their workers' prices, in USD, by tenant (as orchestrator_tenant_tokens_total), worker and model.",
    ["tenant", "worker", "model"],
)
ROUTE_DECISIONS = Counter(
    "orchestrator_route_decisions",
    "Requests routed in a route group, by group, the worker chosen and why (pipeline.routing.RouteReason).",
    ["group", "worker", "reason"],
)
FAILOVERS = Counter(
    "orchestrator_failovers",
    "Answers that went on on another worker after their provider failed mid-stream (pipeline.failover), by the worker that failed and the one that went on.",
    ["from_worker", "to_worker"],
)
OTHER_TENANTS = "other"

# Scaling signals (pipeline.scaling), set by the scheduler alone.
QUEUE_UTILIZATION = Gauge(
    "orchestrator_queue_utilization",
    "Work (in flight plus queued) over the capacity of the live workers consuming each queue.",
    ["queue"],
    multiprocess_mode="livemax",
)
SCALING_SIGNAL = Gauge(
    "orchestrator_scaling_signal",
    "Per queue: 1 scale out, -1 scale in, 0 hold (with hysteresis and a cool-down: docs/operations.md).",
    ["queue"],
    multiprocess_mode="livemax",
)
DESIRED_WORKERS = Gauge(
    "orchestrator_desired_workers",
    "Per queue: the workers its load needs; moves only with a scaling signal.",
    ["queue"],
    multiprocess_mode="livemax",
)

DEGRADED = Gauge(
    "orchestrator_degraded",
    "1 while a process runs on its own copy of shared state because the component (redis) is down.",
    ["component"],
    multiprocess_mode="livemax",  # any live process degraded: the host is
)

CONFIG_VERSION = Gauge(
    "orchestrator_config_version",
    "The stored pipeline config version each process runs (0: the file's, not a stored one).",
    ["process"],
    multiprocess_mode="liveall",  # one series per live process (its pid a label)
)

_children: dict[tuple[object, ...], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, cached: ``labels()`` validates and locks on every
    call (about 2 µs), a dict lookup does not. Label values are bounded (stages,
    workers, error codes, ``TenantLabels``' tenants), so the cache is too."""
    key = (id(metric), *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


class StreamClock:
    """A request as the metrics see it: time to first token (from the gateway's
    acceptance), tokens published, time from first token to the end, the stages'
    timings, and the outcome per worker."""

    def __init__(self, worker: str, *, accepted_at: float | None) -> None:
        self.worker = worker
        self.tokens = 0
        self.stages: list[tuple[str, str, int]] = []  # filled by the engine, recorded at the end
        self._accepted_at = accepted_at
        self._first_at: float | None = None

    def token(self) -> None:
        if self.tokens == 0:
            self._first_at = time.time()
            if self._accepted_at is not None:
                child(TTFT, self.worker).observe(max(0.0, self._first_at - self._accepted_at))
        self.tokens += 1
        child(STREAM_TOKENS, self.worker).inc()

    @property
    def ttft_s(self) -> float | None:
        """Seconds from the gateway's acceptance to the first token (None: none yet)."""
        if self._first_at is None or self._accepted_at is None:
            return None
        return max(0.0, self._first_at - self._accepted_at)

    def finished(self, outcome: str) -> None:
        """Record the request, once it is answered: nothing here delays the client."""
        record_stages(self.stages, self.worker)
        child(PIPELINE_REQUESTS, self.worker, outcome).inc()
        if self._first_at is not None:
            child(STREAM_DURATION, self.worker, outcome).observe(time.time() - self._first_at)


class TenantLabels:
    """A bounded ``tenant`` label: a tenant's own id while it is among the ``limit``
    tenants with the most tokens this process has counted, else ``other``.

    So at most ``limit`` tenant series grow at any time, however many tenants there
    are. A tenant overtaken keeps its series (a counter that vanished would read as a
    reset) and counts under ``other`` from then on; a tenant that overtakes takes its
    place. Each process ranks what it has seen: the big tenants, the ones worth a
    series of their own, are big in every process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._tokens: dict[str, int] = {}  # per tenant: as many entries as there are tenants
        self._top: set[str] = set()
        self._lock = threading.Lock()

    def label(self, tenant: str, tokens: int) -> str:
        with self._lock:
            total = self._tokens[tenant] = self._tokens.get(tenant, 0) + tokens
            if tenant in self._top:
                return tenant
            if len(self._top) < self.limit:
                self._top.add(tenant)
                return tenant
            smallest = min(self._top, key=self._tokens.__getitem__, default=None)
            if smallest is None or total <= self._tokens[smallest]:
                return OTHER_TENANTS
            self._top.discard(smallest)
            self._top.add(tenant)
            return tenant


_tenant_labels: TenantLabels | None = None


def tenant_labels() -> TenantLabels:
    global _tenant_labels
    if _tenant_labels is None:
        _tenant_labels = TenantLabels(settings.METRICS_TENANT_LABELS)
    return _tenant_labels


def tokens_used(tenant_id: str, worker: str, usage: Usage, *, model: str = "", cost_usd: float = 0.0) -> None:
    """An answer's provider tokens, by tenant (bounded: ``TenantLabels``), worker and
    direction, and its cost by tenant, worker and model. Not for answers served by
    deduplication: no provider was called."""
    tenant = tenant_labels().label(tenant_id, usage.total_tokens)
    if usage.prompt_tokens:
        child(TENANT_TOKENS, tenant, worker, "input").inc(usage.prompt_tokens)
    if usage.completion_tokens:
        child(TENANT_TOKENS, tenant, worker, "output").inc(usage.completion_tokens)
    if cost_usd > 0:
        child(SPEND, tenant, worker, model).inc(cost_usd)


def record_stages(observed: list[tuple[str, str, int]], worker: str) -> None:
    """The engine's (stage, outcome, nanoseconds); the inference stage is the worker call."""
    for stage, outcome, elapsed_ns in observed:
        seconds = elapsed_ns / 1e9
        child(STAGE_DURATION, stage, outcome).observe(seconds)
        if stage == "inference":
            child(WORKER_LATENCY, worker, outcome).observe(seconds)


def parse_time(raw: str | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None
