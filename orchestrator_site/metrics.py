"""Prometheus exposition: ``GET /metrics`` on the gateway, and a port on each Celery
worker (``WORKER_METRICS_PORT``).

With ``PROMETHEUS_MULTIPROC_DIR`` set before a process starts, prometheus_client
keeps every process's values in files there, and an exposition aggregates all
the processes that share the directory: under ``make run`` one directory holds
the gateway's and the workers' metrics, so the gateway's ``/metrics`` shows the
whole host. In containers each process group has its own directory and port
(``docker/compose.yml``). Without it, each process exposes its own values.

Besides the recorded metrics (``pipeline.metrics``), a scrape computes:

- ``orchestrator_dedup_hit_ratio``: hits / (hits + misses) of the aggregated
  ``orchestrator_dedup_requests_total``;
- ``orchestrator_circuit_breaker_state{worker}`` (0 closed, 1 half-open, 2 open),
  read from Redis, where the breakers live;
- ``orchestrator_queue_depth{queue}``, read from the broker;
- ``orchestrator_realtime_inflight``, the admitted real-time requests, from Redis;
- batch progress, from Postgres (``batches.metrics``): ``orchestrator_batch_jobs{status}``,
  ``orchestrator_batch_items_pending`` and ``orchestrator_batch_progress_ratio``;
- ``orchestrator_budget_remaining_usd{tenant,scope}``, the budgets' USD left, from
  Postgres and Redis (``services.budgets.remaining_by_tenant``);
- ``orchestrator_metrics_source_up{source}``: 0 when Redis, the broker or Postgres
  could not be read (their gauges are then missing from this scrape, not zero);
- ``orchestrator_gateway_asyncio_tasks``: the asyncio tasks alive in the gateway
  process that answered the scrape (streams, WebSocket connections): a number
  that keeps growing under steady traffic is a leak.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Iterator
from typing import Any

import structlog
from amqp.exceptions import ChannelError as AmqpChannelError
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from kombu import Connection
from kombu.exceptions import ChannelError, OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator_site.errors import ServiceUnavailable

log = structlog.get_logger("orchestrator_site.metrics")
SOURCE_TIMEOUT_S = 2.0  # a scrape never waits longer than this on Redis or the broker


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _source() -> Collector:
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


class Derived(Collector):
    """The recorded metrics, followed by the gauges derived from them."""

    def __init__(self, source: Collector) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        counts = {"hit": 0.0, "miss": 0.0}
        for family in self._source.collect():
            if family.name == "orchestrator_dedup_requests":
                for sample in family.samples:
                    if sample.name.endswith("_total") and sample.labels.get("outcome") in counts:
                        counts[sample.labels["outcome"]] += sample.value
            yield family
        checked = counts["hit"] + counts["miss"]
        yield GaugeMetricFamily(
            "orchestrator_dedup_hit_ratio",
            "Share of deduplication checks answered by an identical request (0 before any check).",
            value=counts["hit"] / checked if checked else 0.0,
        )


class Live(Collector):
    """Gauges whose truth is in Redis or the broker, read at scrape time."""

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("orchestrator_metrics_source_up", "Whether this scrape could read a source (redis, broker, postgres).", labels=["source"])
        redis_families = _guarded(_redis_families, "redis")
        up.add_metric(["redis"], 0 if redis_families is None else 1)
        broker_families = _guarded(_broker_families, "broker")
        up.add_metric(["broker"], 0 if broker_families is None else 1)
        postgres_families = _guarded(_postgres_families, "postgres")
        up.add_metric(["postgres"], 0 if postgres_families is None else 1)
        yield from redis_families or ()
        yield from broker_families or ()
        yield from postgres_families or ()
        yield up


def _guarded(read: Any, source: str) -> list[GaugeMetricFamily] | None:
    try:
        return list(read())
    except (ServiceUnavailable, OperationalError, ChannelError, AmqpChannelError, OSError, DatabaseError) as exc:
        log.warning("metrics_source_down", source=source, outcome="degraded", error_type=type(exc).__name__)
        return None


def _redis_families() -> Iterable[GaugeMetricFamily]:
    from pipeline.config import get_config
    from pipeline.resilience.breaker import read_states
    from pipeline.services.gates import admission
    from pipeline.shared_redis import get_redis

    shared = get_redis()
    states = read_states(shared.client, prefix=shared.prefix, workers=sorted(get_config().workers))
    breaker = GaugeMetricFamily("orchestrator_circuit_breaker_state", "Circuit breaker per worker: 0 closed, 1 half-open, 2 open.", labels=["worker"])
    for worker, state in states.items():
        breaker.add_metric([worker], int(state))
    inflight = GaugeMetricFamily("orchestrator_realtime_inflight", "Real-time requests admitted and not yet finished, all tenants.")
    inflight.add_metric([], admission().in_flight())
    return (breaker, inflight)


def _postgres_families() -> Iterable[GaugeMetricFamily]:
    from batches.metrics import progress_families
    from pipeline.services.budgets import remaining_by_tenant

    try:
        remaining = GaugeMetricFamily(
            "orchestrator_budget_remaining_usd",
            "USD left in the budgets' current periods, by tenant (the METRICS_TENANT_LABELS with the most spent, the rest as other) and scope.",
            labels=["tenant", "scope"],
        )
        for (tenant, scope), left in sorted(remaining_by_tenant(labels=settings.METRICS_TENANT_LABELS).items()):
            remaining.add_metric([tenant, scope], float(left))
        return [*progress_families(), remaining]
    finally:
        # Scrapes run on a thread of their own (the gateway's executor, the worker's
        # metrics server): Django would never hand that thread's connection back.
        # (Inside a transaction, a test's, it is not ours to close.)
        if not connection.in_atomic_block:
            close_old_connections()


def _broker_families() -> Iterable[GaugeMetricFamily]:
    depth = GaugeMetricFamily("orchestrator_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"])
    for queue, size in queue_depths().items():
        depth.add_metric([queue], size)
    return (depth,)


def queue_depths() -> dict[str, int]:
    """Messages waiting in each Celery queue of ours, read from the broker (kombu's
    errors, and ``OSError``, when it cannot be reached)."""
    from pipeline.queues import Queue

    options = {**settings.CELERY_BROKER_TRANSPORT_OPTIONS, "socket_timeout": SOURCE_TIMEOUT_S}
    with Connection(settings.CELERY_BROKER_URL, connect_timeout=SOURCE_TIMEOUT_S, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=int(SOURCE_TIMEOUT_S))
        return {queue.value: _queue_size(conn, queue.value) for queue in Queue}


def _queue_size(conn: Any, name: str) -> int:
    # On Redis a declaration only counts the list (kombu's passive check misses lists
    # under a global key prefix); on AMQP it must be passive, so that the scrape never
    # declares a queue with arguments other than the workers'.
    passive = conn.transport.driver_type != "redis"
    channel = conn.channel()
    try:
        return int(channel.queue_declare(queue=name, passive=passive).message_count)
    except (ChannelError, AmqpChannelError):
        return 0  # not declared yet: nothing waits
    finally:
        channel.close()


class GatewayTasks(Collector):
    """The asyncio tasks of the gateway's event loop, counted on that loop."""

    def __init__(self, count: int) -> None:
        self._count = count

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("orchestrator_gateway_asyncio_tasks", "Asyncio tasks alive in the gateway process that served this scrape.", value=self._count)


def exposition_registry(*extra: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Derived(_source()))
    registry.register(Live())
    for collector in extra:
        registry.register(collector)
    return registry


@require_GET
async def metrics_view(request: HttpRequest) -> HttpResponse:
    tasks = len(asyncio.all_tasks())  # on the gateway's loop, before leaving it
    # Reading Redis and the broker blocks: off the event loop.
    body = await sync_to_async(generate_latest, thread_sensitive=False)(exposition_registry(GatewayTasks(tasks)))
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


def serve_worker_metrics(port: int, addr: str) -> None:
    """The Celery worker's own exposition (``WORKER_METRICS_PORT``)."""
    start_http_server(port, addr=addr, registry=exposition_registry())
    log.info("metrics_serving", port=port, addr=addr, outcome="ok")


def mark_process_dead(pid: int) -> None:
    """A prefork child's live gauges leave with it (multiprocess mode only)."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)
