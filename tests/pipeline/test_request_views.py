"""GET /api/v1/status and /api/v1/result over recorded request states (no worker involved)."""

from __future__ import annotations

import uuid

import pytest

from pipeline.config import get_config
from pipeline.tokenbus import get_bus
from pipeline.types import PipelineResult, Usage
from tests.conftest import TenantFixture


def record(tenant: TenantFixture, status: str, *events: tuple[str, dict]) -> str:
    request_id = uuid.uuid4().hex
    bus = get_bus()
    bus.set_record(request_id, tenant_id=str(tenant.tenant.id), session_id="sess", status=status, created_at="100.5")
    for kind, data in events:
        bus.append(request_id, kind, data)
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
    assert body["status"] == status and body["session_id"] == "sess" and body["created_at"] == "1970-01-01T00:01:40.500000+00:00"
    assert body["updated_at"] > body["created_at"] and body["updated_at"].endswith("+00:00")  # ISO 8601 UTC, as every time here


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


@pytest.mark.django_db(transaction=True)
def test_a_request_retried_by_its_lease_shows_the_answer_of_its_last_attempt(owner: TenantFixture, outsider: TenantFixture, unpublished: list) -> None:
    """A run that died before its first token is run again as the next attempt: the
    status and the result are the request's, whatever attempt answered it; and another
    tenant still finds nothing."""
    from pipeline.services import execute, leases, start
    from tests.conftest import queue_request

    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "second time lucky"}, config=get_config())
    request_id = queue_request(request)
    get_bus().redis.client.zadd(get_bus().leases_key, {request_id: 0})  # its first run died, say, before it began
    assert [(d.request_id, d.attempt) for d in leases.sweep() if d.request_id == request_id] == [(request_id, 2)]
    assert (request_id, 2) in unpublished
    assert owner.client.get(f"/api/v1/status/{request_id}").json()["status"] == "queued"
    execute.realtime_execute(request_id, 1)  # the first attempt's message, late: stale
    execute.realtime_execute(request_id, 2)
    result = owner.client.get(f"/api/v1/result/{request_id}").json()
    assert result["text"].startswith("second time lucky") and result["request_id"] == request_id
    assert [e.attempt for e in get_bus().read_all(request_id)] == [2] * len(get_bus().read_all(request_id))
    assert outsider.client.get(f"/api/v1/status/{request_id}").status_code == 404
    assert outsider.client.get(f"/api/v1/result/{request_id}").status_code == 404


@pytest.mark.django_db
def test_a_request_whose_worker_was_lost_reports_worker_lost(owner: TenantFixture) -> None:
    from pipeline.tokenbus import fencing

    request_id = record(owner, "running")
    get_bus().set_record(request_id, attempt="1", owner="1:gone", streamed="1")
    get_bus().redis.client.zadd(get_bus().leases_key, {request_id: 0})
    assert fencing.lapse(get_bus(), request_id, next_lease_s=5, max_runs=2).outcome is fencing.LapseOutcome.LOST
    assert owner.client.get(f"/api/v1/status/{request_id}").json()["status"] == "failed"
    resp = owner.client.get(f"/api/v1/result/{request_id}")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "worker_lost" and resp["Retry-After"]
