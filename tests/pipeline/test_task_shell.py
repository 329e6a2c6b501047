"""The Celery task is a thin shell: JSON in, one service call, nothing returned."""

from __future__ import annotations

import pytest

from pipeline.config import PipelineSettings
from pipeline.queues import TASK_ROUTES
from pipeline.services import execute, start
from pipeline.tasks import run_realtime
from pipeline.tokenbus import get_bus
from tests.conftest import TenantFixture, queue_request


def test_every_route_names_a_registered_task() -> None:
    from orchestrator_site.celery import app

    assert set(TASK_ROUTES) <= set(app.tasks)


def test_the_task_hands_its_ids_to_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[object, object]] = []
    monkeypatch.setattr(execute, "realtime_execute", lambda request_id, attempt: seen.append((request_id, attempt)))
    run_realtime.run("x", 3)
    run_realtime.run("y")
    assert seen == [("x", 3), ("y", 1)]


@pytest.mark.django_db(transaction=True)
def test_the_task_run_in_process_completes_a_request(owner: TenantFixture) -> None:
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "in process"}, config=PipelineSettings())
    queue_request(request)
    outcome = run_realtime.apply(args=(request.request_id, 1))
    assert outcome.successful() and outcome.result is None
    assert get_bus().get_record(request.request_id)["status"] == "completed"
