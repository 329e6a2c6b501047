"""Starting a request records it before its message is published; the bus takes its
limits from the config."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from pipeline import tokenbus
from pipeline.config import PipelineSettings, TokenBusConfig, get_config
from pipeline.services import start
from pipeline.tasks import run_realtime
from tests.conftest import TenantFixture, start_request


@pytest.mark.django_db
def test_the_start_records_the_request_then_publishes_its_ids(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict] = []
    monkeypatch.setattr(run_realtime, "apply_async", lambda **options: sent.append(options))
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "p"}, config=PipelineSettings())
    before = time.time()
    started = start_request(request)
    record = tokenbus.get_bus().get_record(request.request_id)
    assert started.kind is start.StartKind.SUBMITTED
    assert record["status"] == "queued" and record["tenant_id"] == str(owner.tenant.id) and record["session_id"] == request.session_id
    assert before - 1 < float(record["created_at"]) <= time.time() and record["attempt"] == "1" and record["owner"] == ""
    assert json.loads(record["payload"]) == request.to_dict()  # the request itself stays in Redis
    assert float(record["deadline_at"]) == pytest.approx(float(record["created_at"]) + get_config().limits.request_timeout_s, abs=0.01)
    # Ids only in the message, no publish retries, and the request's id as the task's.
    assert sent == [{"args": (request.request_id, 1), "task_id": request.request_id, "retry": False}]
    # The lease is written in the publishing pool after the start has answered (the client
    # does not wait for it): it appears within a moment.
    deadline = time.monotonic() + 2
    while (lease := tokenbus.get_bus().redis.client.zscore(tokenbus.get_bus().leases_key, request.request_id)) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lease is not None and time.time() < lease <= time.time() + get_config().limits.queue_lease_s


@pytest.fixture
def fresh_bus(pipeline_config: object) -> Iterator[None]:
    tokenbus.set_bus(None)
    pipeline_config(PipelineSettings(tokenbus=TokenBusConfig(maxlen=123, ttl_s=45)))  # type: ignore[operator]
    yield
    tokenbus.set_bus(None)


def test_bus_limits_come_from_the_config(fresh_bus: None) -> None:
    bus = tokenbus.get_bus()
    assert (bus.maxlen, bus.ttl_s) == (123, 45)
    bus.set_record("cfg", status="queued")
    assert 0 < bus.redis.client.ttl(bus.record_key("cfg")) <= 45
