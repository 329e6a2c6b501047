"""Celery tasks: thin shells that take ids and call one service."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from pipeline.services import execute


@shared_task(
    name="pipeline.tasks.run_realtime",
    ignore_result=True,
    # Acknowledged when it starts: a run that dies is noticed by its lease
    # (services.leases), on either broker, and run again or failed from there.
    acks_late=False,
    send_events=settings.REALTIME_TASK_EVENTS,
)
def run_realtime(request_id: str, attempt: int = 1) -> None:
    execute.realtime_execute(request_id, attempt)
