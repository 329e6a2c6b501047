"""Every real-time run has a deadline (``limits.request_timeout_s`` from the request's
acceptance), enforced in the run itself on the thread pool: the provider call is
cancelled, the thread, the admission slot and a half-open breaker's trial are
released, and the client gets ``worker_timeout``.

The fake provider hangs for 3 s and the worker's own timeout is 2 s; the deadline
is 0.5 s: only the deadline can end a run within the second asserted here."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pipeline import streaming
from pipeline.config import BreakerConfig, LimitsConfig, PipelineSettings, get_config, set_config
from pipeline.resilience.breaker import BreakerState
from pipeline.services import gates, leases, start
from pipeline.tokenbus import get_bus
from tests.conftest import Fakes, TenantFixture, queue_request, run_in_process

pytestmark = pytest.mark.django_db(transaction=True)

DEADLINE_S = 0.5


@pytest.fixture
def hanging(fakes: Fakes, clean_breakers: None) -> Iterator[PipelineSettings]:
    fakes.openai.mode, fakes.openai.hang_s = "hang", 3.0
    base = get_config()
    openai = base.workers["openai"].model_copy(update={"breaker": BreakerConfig(failure_threshold=1, open_s=0.3, half_open_trials=1)})
    config = base.model_copy(
        update={"workers": {**base.workers, "openai": openai}, "limits": LimitsConfig(request_timeout_s=DEADLINE_S, max_prompt_chars=2000)}
    )
    set_config(config)
    yield config
    set_config(base)


def timed_out(owner: TenantFixture, config: PipelineSettings) -> tuple[str, float]:
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "slow", "worker": "openai"}, config=config)
    assert gates.admission(config).acquire(request.tenant_id, request.request_id).admitted
    began = time.monotonic()
    run_in_process(request, deadline_in_s=DEADLINE_S)
    return request.request_id, time.monotonic() - began


def test_a_run_past_its_deadline_ends_in_worker_timeout_and_closes_the_provider_call(owner: TenantFixture, fakes: Fakes, hanging: PipelineSettings) -> None:
    request_id, took = timed_out(owner, hanging)
    assert took < 1.5  # the thread is free again: well before the provider's 3 s or the worker's 2 s
    last = get_bus().read_all(request_id)[-1]
    assert (last.type, last.data["code"]) == ("error", "worker_timeout") and "deadline" in last.data["message"]
    deadline = time.monotonic() + 2
    while not fakes.openai.client_aborts and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fakes.openai.client_aborts, "the provider's connection was left open"


def test_a_timed_out_run_gives_back_its_slot_and_its_lease(owner: TenantFixture, hanging: PipelineSettings) -> None:
    request_id, _ = timed_out(owner, hanging)
    assert gates.admission(hanging).in_flight(str(owner.tenant.id)) == 0
    assert get_bus().redis.client.zscore(get_bus().leases_key, request_id) is None
    assert all(run.request_id != request_id for run in leases.keeper.held())


def test_a_half_open_trial_that_times_out_is_resolved_not_left_hanging(owner: TenantFixture, hanging: PipelineSettings) -> None:
    breaker = gates.breaker_for(hanging, "openai")
    breaker.record(success=False)  # open
    time.sleep(0.35)  # half-open: one trial
    timed_out(owner, hanging)  # the trial: it times out, a transient failure
    assert breaker.state() == BreakerState.OPEN  # decided, not held by a trial that never reports
    time.sleep(0.35)
    assert breaker.allow().allowed  # and tried again after open_s


def test_a_request_already_past_its_deadline_calls_no_provider(owner: TenantFixture, fakes: Fakes, hanging: PipelineSettings) -> None:
    calls = len(fakes.openai.requests)
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "too late", "worker": "openai"}, config=hanging)
    run_in_process(request, deadline_in_s=-1)
    last = get_bus().read_all(request.request_id)[-1]
    assert last.data["code"] == "worker_timeout" and "before inference" in last.data["message"]
    assert len(fakes.openai.requests) == calls


def test_the_gateway_waits_the_deadline_and_a_grace_period() -> None:
    assert streaming.wait_s(10) == 10 + gates.DEADLINE_GRACE_S
    *_bounds, slot_lease_s = gates.admission_bounds(PipelineSettings(limits=LimitsConfig(request_timeout_s=10)))
    assert slot_lease_s > streaming.wait_s(10)  # a slot outlives any run that holds it


def test_a_queued_request_whose_deadline_passed_is_failed_by_the_sweep(owner: TenantFixture) -> None:
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "never taken"}, config=get_config())
    request_id = queue_request(request, deadline_in_s=-1)
    get_bus().redis.client.zadd(get_bus().leases_key, {request_id: time.time() - 1})
    leases.sweep()
    assert get_bus().read_all(request_id)[-1].data["code"] == "worker_timeout"
