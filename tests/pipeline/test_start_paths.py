"""Where a started request runs, and who may run it (``services.start``): a worker
through the broker; the gateway itself, on the token bus, while the broker is down;
the gateway itself, on its own gates, while Redis is down. Never two of them."""

from __future__ import annotations

import json
import time

import pytest
from structlog.testing import capture_logs

from orchestrator_site.errors import Overloaded, RateLimited
from pipeline.config import DedupConfig, LimitsConfig, PipelineSettings, set_config
from pipeline.resilience.dedup import dedup_key
from pipeline.resilience.ratelimit import TenantRates
from pipeline.services import execute, gates, start
from pipeline.services.start import StartKind
from pipeline.tokenbus import get_bus
from pipeline.types import PipelineResult, PromptRequest, Usage
from tests.conftest import TenantFixture, start_request

pytestmark = pytest.mark.django_db(transaction=True)


def build(owner: TenantFixture, prompt: str, config: PipelineSettings | None = None) -> PromptRequest:
    return start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": prompt}, config=config or PipelineSettings())


def wait_for_status(request_id: str, status: str, timeout_s: float = 10) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while (record := get_bus().get_record(request_id)).get("status") != status:
        assert time.monotonic() < deadline, record
        time.sleep(0.02)
    return record


def test_with_the_broker_down_the_gateway_runs_attempt_1_and_a_late_message_finds_it_taken(owner: TenantFixture, broker_down: None) -> None:
    request = build(owner, "no broker")
    started = start_request(request)
    assert (started.kind, started.on_the_bus) == (StartKind.RUN_HERE, True)
    record = wait_for_status(request.request_id, "completed")
    assert record["runs"] == "1" and record["attempt"] == "1"
    # The message that did reach the broker after all (a lost reply, say) runs nothing.
    with capture_logs() as logs:
        execute.realtime_execute(request.request_id, 1)
    assert [(e["event"], e["reason"]) for e in logs if e["event"] == "task_stale"] == [("task_stale", "finished")]
    assert [e.type for e in get_bus().read_all(request.request_id)].count("done") == 1


def test_with_redis_down_the_request_runs_here_on_this_processs_gates(owner: TenantFixture, redis_down: None) -> None:
    started = start_request(build(owner, "no redis"))
    assert (started.kind, started.on_the_bus) == (StartKind.LOCAL, False)


def test_with_redis_down_the_local_gates_refuse_as_the_shared_ones_do(owner: TenantFixture, redis_down: None) -> None:
    config = PipelineSettings(limits=LimitsConfig(max_inflight_per_tenant=1))
    rates = TenantRates(requests_per_minute=1000)
    first = build(owner, "holds the slot", config)
    set_config(config)
    try:
        assert start_request(first, rates).kind is StartKind.LOCAL
        with pytest.raises(Overloaded):
            start_request(build(owner, "one too many", config), rates)
        gates.local_admission(config).release(first.tenant_id, first.request_id)
        limited = TenantRates(requests_per_minute=1)
        other_tenant = start.infer_build_request(tenant_id="local-rates", data={"prompt": "x"}, config=config)
        assert start_request(other_tenant, limited).kind is StartKind.LOCAL
        gates.local_admission(config).release(other_tenant.tenant_id, other_tenant.request_id)
        with pytest.raises(RateLimited):
            start_request(start.infer_build_request(tenant_id="local-rates", data={"prompt": "y"}, config=config), limited)
    finally:
        set_config(None)


def test_with_redis_down_an_answer_in_this_processs_window_is_served(owner: TenantFixture, redis_down: None) -> None:
    config = PipelineSettings(dedup=DedupConfig(enabled=True, window_s=30))
    set_config(config)
    try:
        request = build(owner, "seen before", config)
        answer = PipelineResult("earlier", request.session_id, "cached", "echo", "echo-1", "stop", Usage(1, 1), {})
        gates.local_dedup(config).complete(dedup_key(request), json.dumps(answer.to_dict()))
        started = start_request(build(owner, "seen before", config))
        assert started.kind is StartKind.CACHED and started.result == answer
    finally:
        set_config(None)


def test_a_started_requests_kind_says_whether_its_answer_is_on_the_bus() -> None:
    assert {kind for kind in StartKind if start.Started(kind, "r").on_the_bus} == {StartKind.SUBMITTED, StartKind.ATTACHED, StartKind.RUN_HERE}
