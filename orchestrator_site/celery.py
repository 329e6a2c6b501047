"""The one Celery app. Queues are declared from ``pipeline.queues.Queue``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, worker_process_init, worker_process_shutdown, worker_ready
from kombu import Exchange
from kombu import Queue as KombuQueue

from orchestrator_site.lane import LaneStep

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")

app = Celery("orchestrator_site")
app.config_from_object("django.conf:settings", namespace="CELERY")


def _declare_queues() -> None:
    from pipeline.queues import TASK_ROUTES, Queue

    exchange = Exchange("orchestrator", type="direct")
    app.conf.update(
        task_queues=tuple(KombuQueue(q.value, exchange, routing_key=q.value) for q in Queue),
        # Nothing may land on Celery's implicit "celery" queue, which no worker here consumes.
        task_default_queue=Queue.BATCH_DEFAULT.value,
        task_default_exchange=exchange.name,
        task_default_routing_key=Queue.BATCH_DEFAULT.value,
        task_routes=TASK_ROUTES,
    )


_declare_queues()
app.autodiscover_tasks(["pipeline", "batches"])
app.steps["worker"].add(LaneStep)  # a real-time worker's own consumer of `realtime` (orchestrator_site.lane)


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    from django.conf import settings

    from orchestrator_site.metrics import serve_worker_metrics

    if settings.WORKER_METRICS_PORT:
        serve_worker_metrics(settings.WORKER_METRICS_PORT, settings.WORKER_METRICS_ADDR)


@worker_ready.connect
@worker_process_init.connect  # a prefork pool's process, after the fork
def _settle(**_: Any) -> None:
    from orchestrator_site import gctune

    gctune.settle()


@worker_process_shutdown.connect
def _forget_process(pid: int | None = None, **_: Any) -> None:
    from orchestrator_site.metrics import mark_process_dead

    mark_process_dead(pid or os.getpid())


def worker_queues(options: dict[str, Any]) -> set[str]:
    raw = options.get("queues") or []
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    return {str(q).strip() for q in items if str(q).strip()}


@celeryd_init.connect
def _realtime_is_at_most_once(conf: Any = None, options: dict[str, Any] | None = None, **_: Any) -> None:
    """A worker that consumes only ``realtime`` takes its messages off the Redis
    broker without kombu's ack emulation. Real-time tasks are at most once anyway
    (``acks_late=False``: a lost one is answered by the gateway), and the emulation's
    bookkeeping is what crashes a worker whose Redis goes away with a message
    unacked (kombu: "'NoneType' object has no attribute 'hostname'" while
    restoring it)."""
    from pipeline.queues import Queue

    if conf is not None and worker_queues(options or {}) == {Queue.REALTIME.value}:
        conf.broker_transport_options = {**conf.broker_transport_options, "ack_emulation": False}
