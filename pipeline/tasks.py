"""Celery tasks: thin shells that take JSON and call one service."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.conf import settings

from pipeline import services


@shared_task(
    name="pipeline.tasks.run_realtime",
    ignore_result=True,
    # At most once: a real-time request whose worker died is answered by the
    # gateway's timeout, not replayed minutes later to a client that has gone.
    acks_late=False,
    soft_time_limit=150,
    time_limit=180,
    send_events=settings.REALTIME_TASK_EVENTS,
)
def run_realtime(payload: dict[str, Any]) -> None:
    services.realtime_execute(payload)
