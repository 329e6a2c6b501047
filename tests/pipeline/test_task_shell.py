"""The Celery task is a thin shell: JSON in, one service call, nothing returned."""

from __future__ import annotations

import pytest

from pipeline import services
from pipeline.config import PipelineSettings
from pipeline.queues import TASK_ROUTES
from pipeline.tasks import run_realtime
from pipeline.tokenbus import get_bus
from tests.conftest import TenantFixture


def test_every_route_names_a_registered_task() -> None:
    from orchestrator_site.celery import app

    assert set(TASK_ROUTES) <= set(app.tasks)


def test_the_task_hands_its_payload_to_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    monkeypatch.setattr(services, "realtime_execute", seen.append)
    run_realtime.run({"request_id": "x"})
    assert seen == [{"request_id": "x"}]


@pytest.mark.django_db(transaction=True)
def test_the_task_run_in_process_completes_a_request(owner: TenantFixture) -> None:
    request = services.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "in process"}, config=PipelineSettings())
    get_bus().set_status(request.request_id, tenant_id=request.tenant_id, status="queued")
    outcome = run_realtime.apply(args=(request.to_dict(),))
    assert outcome.successful() and outcome.result is None
    assert get_bus().get_status(request.request_id)["status"] == "completed"
