"""Beyond the real-time queue's bounds the gateway sheds at once: 503 with Retry-After."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from pipeline.config import LimitsConfig, PipelineSettings
from pipeline.services import execute, gates, start
from pipeline.tokenbus import get_bus
from tests.conftest import TenantFixture, queue_request, run_in_process


def _free_every_slot() -> None:
    bus = get_bus()
    keys = bus.redis.client.keys(f"{bus.prefix}:inflight*")
    if keys:
        bus.redis.client.delete(*keys)


@pytest.fixture
def tight(pipeline_config: object) -> Iterator[PipelineSettings]:
    # Before too: a test that submitted without a worker (the I/O budget's) leaves its slots held.
    _free_every_slot()
    config = pipeline_config(PipelineSettings(limits=LimitsConfig(max_inflight_per_tenant=2, max_inflight_global=3)))  # type: ignore[operator]
    yield config
    _free_every_slot()


@pytest.mark.django_db
def test_a_tenant_over_its_bound_is_shed_with_retry_after(owner: TenantFixture, outsider: TenantFixture, tight: PipelineSettings) -> None:
    gate = gates.admission()
    for n in range(2):
        assert gate.acquire(str(owner.tenant.id), f"held-{n}").admitted
    resp = owner.client.post("/api/v1/infer", {"prompt": "one more"}, format="json")
    assert resp.status_code == 503 and resp["Retry-After"] == "1"
    assert resp.json()["error"] == {
        "code": "overloaded",
        "message": "the tenant real-time queue is full (2 requests in flight)",
        "data": {"scope": "tenant", "limit": 2, "retry_after": 1.0},
    }
    # Another tenant is not held back by the first one's backlog.
    other = outsider.client.post("/api/v1/infer", {"prompt": "mine", "wait": False}, format="json")
    assert other.status_code == 202


@pytest.mark.django_db
def test_the_global_bound_sheds_every_tenant(owner: TenantFixture, tight: PipelineSettings) -> None:
    gate = gates.admission()
    for n in range(3):
        assert gate.acquire(f"someone-{n}", f"held-{n}").admitted
    resp = owner.client.post("/api/v1/infer", {"prompt": "p"}, format="json")
    assert resp.status_code == 503 and resp.json()["error"]["data"] == {"scope": "global", "limit": 3, "retry_after": 1.0}


@pytest.mark.django_db
def test_a_shed_request_leaves_no_trace(owner: TenantFixture, tight: PipelineSettings, unpublished: list[tuple[str, int]]) -> None:
    gate = gates.admission()
    gate.acquire(str(owner.tenant.id), "a")
    gate.acquire(str(owner.tenant.id), "b")
    resp = owner.client.post("/api/v1/infer", {"prompt": "p", "wait": False}, format="json")
    assert resp.status_code == 503 and unpublished == [] and gate.in_flight(str(owner.tenant.id)) == 2
    bus = get_bus()
    assert [key for key in bus.redis.client.scan_iter(f"{bus.prefix}:req:*") if bus.redis.client.hget(key, "tenant_id") == str(owner.tenant.id)] == []


@pytest.mark.django_db(transaction=True)
def test_finished_requests_give_their_slot_back(owner: TenantFixture, tight: PipelineSettings) -> None:
    for _ in range(4):  # more than the bound, one after another
        request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "p"}, config=tight)
        assert gates.admission().acquire(request.tenant_id, request.request_id).admitted
        run_in_process(request)
    assert gates.admission().in_flight(str(owner.tenant.id)) == 0


@pytest.mark.django_db(transaction=True)
def test_with_the_broker_down_the_gateway_runs_it_and_gives_the_slot_back(owner: TenantFixture, tight: PipelineSettings, broker_down: None) -> None:
    resp = owner.client.post("/api/v1/infer", {"prompt": "no broker", "wait": False}, format="json")
    assert resp.status_code == 202
    request_id = resp.json()["request_id"]
    # Redis is up: the gateway ran it through the token bus, as a worker would, so the
    # status and the result say what happened.
    deadline = time.monotonic() + 10
    while owner.client.get(f"/api/v1/status/{request_id}").json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert owner.client.get(f"/api/v1/result/{request_id}").json()["text"].startswith("no broker")
    assert gates.admission().in_flight(str(owner.tenant.id)) == 0
    record = get_bus().get_record(request_id)
    assert record["executed_by"].endswith(f":{os.getpid()}") and record["runs"] == "1"


@pytest.mark.django_db(transaction=True)
def test_an_inline_failure_is_recorded_for_the_result_endpoint(owner: TenantFixture, broker_down: None, fakes: object) -> None:
    fakes.openai.mode = "401"  # type: ignore[attr-defined]
    session = f"inline-{owner.tenant.id}"
    resp = owner.client.post("/api/v1/infer", {"prompt": "x", "worker": "openai", "session_id": session}, format="json")
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "worker_auth_error"
    bus = get_bus()
    mine = [key.rsplit(":", 1)[1] for key in bus.redis.client.scan_iter(f"{bus.prefix}:req:*") if bus.redis.client.hget(key, "session_id") == session]
    assert len(mine) == 1 and bus.get_record(mine[0])["status"] == "failed"
    error = owner.client.get(f"/api/v1/result/{mine[0]}").json()["error"]
    assert error["code"] == "worker_auth_error"


@pytest.mark.django_db(transaction=True)
def test_redis_gone_mid_task_is_logged_not_raised(owner: TenantFixture) -> None:
    from structlog.testing import capture_logs

    from pipeline.shared_redis import SharedRedis
    from pipeline.tokenbus import TokenBus, set_bus
    from tests.conftest import free_port

    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "p"}, config=PipelineSettings())
    set_bus(TokenBus(redis=SharedRedis(url=f"redis://127.0.0.1:{free_port()}/0", prefix="gone", socket_timeout_s=0.5), maxlen=10, ttl_s=10))
    try:
        with capture_logs() as logs:
            execute.realtime_execute(request.request_id, 1)  # must not raise into Celery
    finally:
        set_bus(None)
    unanswered = [e for e in logs if e["event"] == "task_unanswered"]
    assert unanswered and unanswered[0]["outcome"] == "degraded"


@pytest.mark.django_db(transaction=True)
def test_an_unexpected_failure_while_answering_stays_inside_the_task(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from structlog.testing import capture_logs

    from pipeline.tokenbus import fencing

    def broken(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("bug in answering")

    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "p"}, config=PipelineSettings())
    queue_request(request)
    monkeypatch.setattr(fencing, "begin", broken)  # the run's start
    with capture_logs() as logs:
        execute.realtime_execute(request.request_id, 1)
    unanswered = [e for e in logs if e["event"] == "task_unanswered"]
    assert unanswered and unanswered[0]["outcome"] == "error" and unanswered[0]["error_type"] == "RuntimeError"
