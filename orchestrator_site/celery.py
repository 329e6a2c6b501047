"""The one Celery app. Queues are declared from ``pipeline.queues.Queue``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_shutdown, worker_ready
from kombu import Exchange
from kombu import Queue as KombuQueue

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


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    from django.conf import settings

    from orchestrator_site.metrics import serve_worker_metrics

    if settings.WORKER_METRICS_PORT:
        serve_worker_metrics(settings.WORKER_METRICS_PORT, settings.WORKER_METRICS_ADDR)


@worker_process_shutdown.connect
def _forget_process(pid: int | None = None, **_: Any) -> None:
    from orchestrator_site.metrics import mark_process_dead

    mark_process_dead(pid or os.getpid())
