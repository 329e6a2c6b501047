"""GET /api/v1/status and /api/v1/result over recorded request states (no worker involved)."""

from __future__ import annotations

import uuid

import pytest

from pipeline.tokenbus import get_bus
from pipeline.types import PipelineResult, Usage
from tests.conftest import TenantFixture


def record(tenant: TenantFixture, status: str, *events: tuple[str, dict]) -> str:
    request_id = uuid.uuid4().hex
    bus = get_bus()
    bus.set_status(request_id, tenant_id=str(tenant.tenant.id), session_id="sess", status=status, created_at="100.5")
    for kind, data in events:
        bus.publish(request_id, kind, data)
    return request_id


RESULT = PipelineResult(
    request_id="r",
    session_id="sess",
    text="done text",
    worker="echo",
    model="echo-1",
    finish_reason="stop",
    usage=Usage(1, 2),
    timings_us={"rag": 1, "assemble": 2, "inference": 3, "post": 4, "stream": 5},
)


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["queued", "running", "completed", "failed"])
def test_status_reports_each_state(owner: TenantFixture, status: str) -> None:
    request_id = record(owner, status)
    body = owner.client.get(f"/api/v1/status/{request_id}").json()
    assert body["status"] == status and body["session_id"] == "sess" and body["created_at"] == 100.5 and body["updated_at"] > 100.5


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["queued", "running"])
def test_result_while_pending_is_202(owner: TenantFixture, status: str) -> None:
    request_id = record(owner, status, ("token", {"seq": 0, "text": "partial"}))
    resp = owner.client.get(f"/api/v1/result/{request_id}")
    assert resp.status_code == 202 and resp.json() == {"request_id": request_id, "status": status}


@pytest.mark.django_db
def test_result_when_completed(owner: TenantFixture) -> None:
    request_id = record(owner, "completed", ("token", {"seq": 0, "text": "done text"}), ("done", RESULT.to_dict()))
    resp = owner.client.get(f"/api/v1/result/{request_id}")
    assert resp.status_code == 200 and resp.json() == RESULT.to_dict()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("error", "status"),
    [
        ({"code": "worker_rate_limited", "message": "slow down", "data": {"retry_after": 4}}, 429),
        ({"code": "internal_error", "message": "internal error", "data": {}}, 500),
    ],
)
def test_result_when_failed_is_the_recorded_error(owner: TenantFixture, error: dict, status: int) -> None:
    request_id = record(owner, "failed", ("error", error))
    resp = owner.client.get(f"/api/v1/result/{request_id}")
    assert resp.status_code == status and resp.json() == {"error": error}
    if status == 429:
        assert resp["Retry-After"] == "4"


@pytest.mark.django_db
def test_outsider_never_sees_any_state(owner: TenantFixture, outsider: TenantFixture) -> None:
    for status in ("queued", "completed", "failed"):
        request_id = record(owner, status, ("done", RESULT.to_dict()))
        for path in ("status", "result"):
            resp = outsider.client.get(f"/api/v1/{path}/{request_id}")
            assert resp.status_code == 404 and resp.json()["error"]["data"] == {"request_id": request_id}


@pytest.mark.django_db
def test_status_needs_a_key(anon: object, owner: TenantFixture) -> None:
    request_id = record(owner, "queued")
    assert anon.get(f"/api/v1/status/{request_id}").status_code == 401  # type: ignore[attr-defined]
