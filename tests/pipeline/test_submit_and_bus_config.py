"""Submitting a request records it before the task runs; the bus takes its limits from the config."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pipeline import services, tokenbus
from pipeline.config import PipelineSettings, TokenBusConfig
from pipeline.tasks import run_realtime
from tests.conftest import TenantFixture


@pytest.mark.django_db
def test_submit_records_queued_then_publishes(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple] = []
    monkeypatch.setattr(run_realtime, "apply_async", lambda **options: sent.append(options))
    request = services.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "p"}, config=PipelineSettings())
    before = time.time()
    services.infer_submit(request=request)
    status = tokenbus.get_bus().get_status(request.request_id)
    assert status["status"] == "queued" and status["tenant_id"] == str(owner.tenant.id) and status["session_id"] == request.session_id
    assert before - 1 < float(status["created_at"]) <= time.time()
    assert len(sent) == 1 and sent[0]["args"] == (request.to_dict(),) and sent[0]["retry"] is False  # JSON payload only, and no publish retries
    assert sent[0]["argsrepr"] == f"(<request {request.request_id}>,)"  # no prompt in the message's headers


@pytest.fixture
def fresh_bus(pipeline_config: object) -> Iterator[None]:
    previous = tokenbus._bus
    tokenbus._bus = None
    pipeline_config(PipelineSettings(tokenbus=TokenBusConfig(maxlen=123, ttl_s=45)))  # type: ignore[operator]
    yield
    tokenbus._bus = previous


def test_bus_limits_come_from_the_config(fresh_bus: None) -> None:
    bus = tokenbus.get_bus()
    assert (bus.maxlen, bus.ttl_s) == (123, 45)
    bus.set_status("cfg", status="queued")
    assert 0 < bus.client.ttl(bus.status_key("cfg")) <= 45
