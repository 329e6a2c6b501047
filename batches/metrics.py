"""Batch progress as Prometheus sees it.

Recorded in the batch worker: ``orchestrator_batch_items_total{priority, outcome}``
(``ok``, an error code, or ``retry_later`` for an item put back while its provider
is down). Read from Postgres at scrape time (``progress_families``, registered by
``orchestrator_site.metrics``): jobs by status, the items of active jobs still
pending, and the share of those jobs' items finished.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import Count, Sum
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

from batches.models import BatchJob
from pipeline.metrics import child

BATCH_ITEMS = Counter(
    "orchestrator_batch_items",
    "Batch items run by a batch worker, by job priority and outcome (ok, an error code, or retry_later).",
    ["priority", "outcome"],
)


def item_finished(priority: str, outcome: str) -> None:
    child(BATCH_ITEMS, priority, outcome).inc()


def items_finished(priority: str, outcome: str, count: int) -> None:
    """``count`` items ended together (a job's items expired at its deadline)."""
    child(BATCH_ITEMS, priority, outcome).inc(count)


def progress_families() -> Iterable[GaugeMetricFamily]:
    """Two queries: jobs per status, and the item counts of the active jobs."""
    jobs = GaugeMetricFamily("orchestrator_batch_jobs", "Batch jobs by status.", labels=["status"])
    counts = dict(BatchJob.objects.order_by().values_list("status").annotate(n=Count("id")).values_list("status", "n"))
    for status in BatchJob.Status:
        jobs.add_metric([status.value], counts.get(status.value, 0))
    active = BatchJob.objects.filter(status__in=BatchJob.ACTIVE).aggregate(
        total=Sum("items_total"), done=Sum("items_done"), failed=Sum("items_failed"), expired=Sum("items_expired")
    )
    total, settled = active["total"] or 0, (active["done"] or 0) + (active["failed"] or 0) + (active["expired"] or 0)
    pending = GaugeMetricFamily("orchestrator_batch_items_pending", "Items of queued and running batch jobs not answered or failed yet.", value=total - settled)
    progress = GaugeMetricFamily(
        "orchestrator_batch_progress_ratio",
        "Share of the items of queued and running batch jobs that are answered or failed (1 when no job is active).",
        value=settled / total if total else 1.0,
    )
    return (jobs, pending, progress)
