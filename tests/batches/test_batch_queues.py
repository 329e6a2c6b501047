"""The batches app and its queues: registered, declared, and never consumed by real-time workers."""

from __future__ import annotations

import pytest
from django.apps import apps

from orchestrator_site.celery import app
from pipeline.queues import Queue
from tests.conftest import WorkerProcess


def test_batches_app_is_registered() -> None:
    config = apps.get_app_config("batches")
    assert config.name == "batches" and config.verbose_name == "Batches"


def test_three_priority_queues_are_declared_for_batches() -> None:
    declared = {q.name for q in app.conf.task_queues}
    assert {"batch.high", "batch.default", "batch.low"} <= declared
    assert [q.value for q in Queue.batch_queues()] == ["batch.high", "batch.default", "batch.low"]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_realtime_worker_consumes_only_realtime(realtime_worker: WorkerProcess) -> None:
    """Its Celery consumer takes ``realtime`` and no other queue: a 10,000-prompt batch
    can never sit in front of a real-time request."""
    replies = app.control.inspect(timeout=2).active_queues() or {}
    queues = [q["name"] for node, qs in replies.items() if node.startswith("realtime-test-") for q in qs]
    assert queues == ["realtime"]
