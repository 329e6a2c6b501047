"""The one Celery app. Queues are declared from ``pipeline.queues.Queue``."""

from __future__ import annotations

import os

from celery import Celery
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
