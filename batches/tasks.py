"""Celery tasks of the batch queues: thin shells around ``batches.services``."""

from __future__ import annotations

from celery import shared_task

from batches import services


@shared_task(
    name="batches.tasks.run_batch_chunk",
    ignore_result=True,
    # Acknowledged after the run: a chunk whose worker died is delivered again. Items
    # are claimed and recorded in Postgres, so a second delivery never runs one twice.
    acks_late=True,
    reject_on_worker_lost=True,
)
def run_batch_chunk(job_id: str, first: int, last: int) -> None:
    services.batch_run_chunk(job_id=job_id, first=first, last=last)


@shared_task(name="batches.tasks.recover_batches", ignore_result=True)
def recover_batches() -> None:
    services.batch_recover_boundary()


@shared_task(name="batches.tasks.deliver_batch", ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def deliver_batch(job_id: str) -> None:
    services.batch_deliver(job_id=job_id)
