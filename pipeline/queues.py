"""Celery queues. Real-time and batch traffic never share a queue or a worker pool."""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    REALTIME = "realtime"
    BATCH_HIGH = "batch.high"
    BATCH_DEFAULT = "batch.default"
    BATCH_LOW = "batch.low"

    @classmethod
    def batch_queues(cls) -> tuple[Queue, ...]:
        return (cls.BATCH_HIGH, cls.BATCH_DEFAULT, cls.BATCH_LOW)


TASK_ROUTES: dict[str, dict[str, str]] = {
    "pipeline.tasks.run_realtime": {"queue": Queue.REALTIME.value, "routing_key": Queue.REALTIME.value},
}
