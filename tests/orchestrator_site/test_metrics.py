"""GET /metrics: the Prometheus exposition of the gateway, with the gauges computed
at scrape time from Redis, the broker and Postgres, and what a scrape does when they are down."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.test import Client, override_settings
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from orchestrator_site import metrics as exposition
from orchestrator_site.celery import app
from pipeline.config import get_config
from pipeline.queues import Queue
from pipeline.resilience.breaker import BreakerPolicy, BreakerState, CircuitBreaker, read_states
from pipeline.shared_redis import SharedRedis, set_redis
from pipeline.tokenbus import get_bus
from tests.conftest import free_port

# A scrape reads batch progress from Postgres (on a thread of its own).
pytestmark = pytest.mark.django_db

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape() -> Samples:
    resp = Client().get("/metrics")
    assert resp.status_code == 200
    assert resp["Content-Type"].startswith("text/plain; version=")
    return parse(resp.content.decode())


def test_the_exposition_has_every_scrape_time_gauge(clean_breakers: None) -> None:
    samples = scrape()
    assert value(samples, "orchestrator_metrics_source_up", source="redis") == 1
    assert value(samples, "orchestrator_metrics_source_up", source="broker") == 1
    for worker in get_config().workers:
        assert value(samples, "orchestrator_circuit_breaker_state", worker=worker) == 0
    for queue in Queue:
        assert value(samples, "orchestrator_queue_depth", queue=queue.value) is not None
    assert value(samples, "orchestrator_realtime_inflight") is not None
    assert value(samples, "orchestrator_dedup_hit_ratio") is not None
    assert value(samples, "orchestrator_metrics_source_up", source="postgres") == 1
    for status in ("queued", "running", "completed", "cancelled"):
        assert value(samples, "orchestrator_batch_jobs", status=status) is not None
    assert value(samples, "orchestrator_batch_items_pending") is not None and value(samples, "orchestrator_batch_progress_ratio") is not None


def test_a_scrape_on_a_thread_of_its_own_hands_its_database_connection_back() -> None:
    from django.db import connection

    held: list[object] = []

    def scrape_like_the_worker_metrics_server() -> None:
        list(exposition._postgres_families())
        held.append(connection.connection)  # this thread's: None once handed back to the pool

    thread = threading.Thread(target=scrape_like_the_worker_metrics_server)
    thread.start()
    thread.join(timeout=30)
    assert held == [None]


def test_only_get_is_allowed() -> None:
    assert Client().post("/metrics").status_code == 405


def test_breaker_state_is_read_from_redis(clean_breakers: None) -> None:
    bus = get_bus()
    worker = sorted(get_config().workers)[0]
    breaker = CircuitBreaker(bus.redis.client, prefix=bus.prefix, worker=worker, policy=BreakerPolicy(failure_threshold=1, open_s=0.0))
    breaker.record(success=False)
    assert value(scrape(), "orchestrator_circuit_breaker_state", worker=worker) == BreakerState.OPEN
    breaker.allow()  # open_s has passed: the next request is a trial
    assert value(scrape(), "orchestrator_circuit_breaker_state", worker=worker) == BreakerState.HALF_OPEN
    breaker.record(success=True)
    assert value(scrape(), "orchestrator_circuit_breaker_state", worker=worker) == BreakerState.CLOSED
    assert read_states(bus.redis.client, prefix=bus.prefix, workers=[]) == {}


def test_queue_depth_counts_waiting_messages() -> None:
    # No worker of the suite consumes batch.low: what is sent there waits.
    before = value(scrape(), "orchestrator_queue_depth", queue="batch.low")
    for _ in range(3):
        app.send_task("pipeline.tasks.nothing", queue=Queue.BATCH_LOW.value, routing_key=Queue.BATCH_LOW.value)
    try:
        assert value(scrape(), "orchestrator_queue_depth", queue="batch.low") == (before or 0) + 3
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(Queue.BATCH_LOW.value)
    assert value(scrape(), "orchestrator_queue_depth", queue="batch.low") == 0


def test_queue_depth_on_rabbitmq_too() -> None:
    with override_settings(CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//"):
        samples = scrape()
    assert value(samples, "orchestrator_metrics_source_up", source="broker") == 1
    assert all(value(samples, "orchestrator_queue_depth", queue=q.value) is not None for q in Queue)


def test_inflight_counts_admitted_requests() -> None:
    from pipeline.services.gates import admission

    gate = admission()
    before = value(scrape(), "orchestrator_realtime_inflight") or 0
    gate.acquire("tenant-m", "req-m1")
    try:
        assert value(scrape(), "orchestrator_realtime_inflight") == before + 1
    finally:
        gate.release("tenant-m", "req-m1")


def test_redis_down_leaves_its_gauges_out_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    set_redis(SharedRedis(url=f"redis://127.0.0.1:{free_port()}/0", prefix="x", socket_timeout_s=0.5))
    try:
        samples = scrape()
    finally:
        set_redis(None)
    assert value(samples, "orchestrator_metrics_source_up", source="redis") == 0
    assert not any(name == "orchestrator_circuit_breaker_state" for name, _ in samples)
    assert value(samples, "orchestrator_metrics_source_up", source="broker") == 1


def test_broker_down_leaves_queue_depth_out() -> None:
    with override_settings(CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0"):
        samples = scrape()
    assert value(samples, "orchestrator_metrics_source_up", source="broker") == 0
    assert not any(name == "orchestrator_queue_depth" for name, _ in samples)
    assert value(samples, "orchestrator_metrics_source_up", source="redis") == 1


def test_dedup_hit_ratio_is_derived_from_the_counters() -> None:
    source = CollectorRegistry()
    assert value(parse_registry(exposition.Derived(source)), "orchestrator_dedup_hit_ratio") == 0.0
    counter = Counter("orchestrator_dedup_requests", "test", ["outcome"], registry=source)
    counter.labels("hit").inc(3)
    counter.labels("miss").inc(1)
    samples = parse_registry(exposition.Derived(source))
    assert value(samples, "orchestrator_dedup_hit_ratio") == 0.75
    assert value(samples, "orchestrator_dedup_requests_total", outcome="hit") == 3  # the source passes through


def parse_registry(collector: exposition.Derived) -> Samples:
    from prometheus_client import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def test_multiprocess_mode_aggregates_the_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # the suite runs as `make run` does
    assert exposition._source() is not REGISTRY
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert exposition._source() is REGISTRY and exposition.multiprocess_dir() is None


def test_a_dead_process_leaves_no_live_gauge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    live = tmp_path / "gauge_livesum_4242.db"
    live.write_bytes(b"")
    kept = tmp_path / "counter_4242.db"
    kept.write_bytes(b"")
    exposition.mark_process_dead(4242)
    assert not live.exists() and kept.exists()  # counters of the dead still count
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    exposition.mark_process_dead(4242)  # without the directory: nothing to do


def test_a_worker_serves_its_exposition_on_its_port() -> None:
    port = free_port()
    exposition.serve_worker_metrics(port, "127.0.0.1")
    samples = parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    assert value(samples, "orchestrator_metrics_source_up", source="redis") == 1


def test_the_worker_port_is_opened_when_the_worker_is_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator_site.celery import _serve_metrics

    port = free_port()
    with override_settings(WORKER_METRICS_PORT=0):
        _serve_metrics()  # not configured: no port
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with override_settings(WORKER_METRICS_PORT=port, WORKER_METRICS_ADDR="127.0.0.1"):
        _serve_metrics()
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200


@pytest.mark.django_db(transaction=True)  # the scrape reads Postgres from a thread of its own
def test_the_budgets_gauge_names_no_more_tenants_than_the_setting_allows(owner: Any, settings: Any) -> None:
    from decimal import Decimal

    from pipeline.models import Budget

    settings.METRICS_TENANT_LABELS = 0  # every tenant counted as other
    Budget.objects.create(tenant=owner.tenant, amount_usd=Decimal("2.5"), period="total")
    scraped = Client().get("/metrics").content.decode()
    samples = [s for f in text_string_to_metric_families(scraped) for s in f.samples if s.name == "orchestrator_budget_remaining_usd"]
    assert [(s.labels, s.value) for s in samples] == [({"tenant": "other", "scope": "tenant"}, 2.5)]
