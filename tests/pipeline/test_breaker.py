"""The circuit breaker: its states shared through Redis, fallback routing, failing fast."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

from orchestrator_site.errors import CircuitOpen, ConfigInvalid, WorkerAuthError, WorkerTimeout
from pipeline.config import BreakerConfig, PipelineSettings, WorkerConfig, load_config, set_config
from pipeline.resilience.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from pipeline.services import execute, gates, start
from pipeline.tokenbus import get_bus
from pipeline.types import PromptRequest
from tests.conftest import Fakes, TenantFixture, WorkerProcess, queue_request


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.close()


def breaker(client: redis.Redis, prefix: str, **policy: float) -> CircuitBreaker:
    return CircuitBreaker(client, prefix=prefix, worker="w", policy=BreakerPolicy(**policy))  # type: ignore[arg-type]


def test_consecutive_failures_open_the_circuit(client: redis.Redis) -> None:
    b = breaker(client, uuid.uuid4().hex, failure_threshold=3, open_s=30)
    assert b.state() == BreakerState.CLOSED and b.allow().allowed
    assert b.record(success=False) == BreakerState.CLOSED
    b.record(success=True)  # a success resets the count: failures must be consecutive
    b.record(success=False)
    b.record(success=False)
    assert b.record(success=False) == BreakerState.OPEN
    refused = b.allow()
    assert not refused.allowed and refused.state == BreakerState.OPEN and 29 < refused.retry_after_s <= 30


def test_the_state_is_shared_by_every_process(client: redis.Redis) -> None:
    prefix = uuid.uuid4().hex
    other_client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        here, there = breaker(client, prefix, failure_threshold=1), breaker(other_client, prefix, failure_threshold=1)
        here.record(success=False)
        assert there.state() == BreakerState.OPEN and not there.allow().allowed
    finally:
        other_client.close()


def test_half_open_lets_a_limited_number_of_trials_through(client: redis.Redis) -> None:
    b = breaker(client, uuid.uuid4().hex, failure_threshold=1, open_s=0.5, half_open_trials=2)
    b.record(success=False)
    time.sleep(0.55)
    first, second, third = b.allow(), b.allow(), b.allow()
    assert first.allowed and second.allowed and first.state == BreakerState.HALF_OPEN
    assert not third.allowed and third.state == BreakerState.HALF_OPEN


def test_a_successful_trial_closes_and_a_failed_one_reopens(client: redis.Redis) -> None:
    b = breaker(client, uuid.uuid4().hex, failure_threshold=1, open_s=0.5)
    b.record(success=False)
    time.sleep(0.55)
    assert b.allow().allowed
    assert b.record(success=False) == BreakerState.OPEN  # one failure in half-open is enough
    time.sleep(0.55)
    assert b.allow().allowed
    assert b.record(success=True) == BreakerState.CLOSED and b.allow().allowed


def test_a_trial_that_never_reports_does_not_wedge_the_breaker(client: redis.Redis) -> None:
    b = breaker(client, uuid.uuid4().hex, failure_threshold=1, open_s=0.5)
    b.record(success=False)
    time.sleep(0.55)
    assert b.allow().allowed and not b.allow().allowed  # the trial's request died somewhere
    time.sleep(0.55)
    assert b.allow().allowed


@pytest.mark.django_db(transaction=True)
def test_a_stale_message_asks_the_breaker_nothing(owner: TenantFixture, clean_breakers: None) -> None:
    """A redelivered message finds its request finished: it is dropped before the
    breaker is asked, so it takes no half-open trial (one whose outcome would never come)."""
    config = PipelineSettings(workers={"echo": WorkerConfig(kind="echo", breaker=BreakerConfig(failure_threshold=1, open_s=0.2, half_open_trials=1))})
    set_config(config)
    try:
        breaker = gates.breaker_for(config, "echo")
        breaker.record(success=False)
        time.sleep(0.25)  # half-open: one trial left
        request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "stale"}, config=config)
        queue_request(request)
        get_bus().set_record(request.request_id, status="completed")
        execute.realtime_execute(request.request_id, 1)
        assert breaker.allow().allowed  # the one trial was still there
    finally:
        set_config(None)


def test_fallback_must_name_another_worker(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="is this worker itself"):
        PipelineSettings(workers={"echo": WorkerConfig(kind="echo", fallback="echo")})
    with pytest.raises(ValueError, match="is not a worker"):
        PipelineSettings(workers={"echo": WorkerConfig(kind="echo", fallback="ghost")})
    path = tmp_path / "pipeline.toml"  # type: ignore[operator]
    path.write_text('[workers.echo]\nkind = "echo"\nfallback = "nope"\n')
    with pytest.raises(ConfigInvalid):
        load_config(path)


CONFIG = PipelineSettings(
    workers={
        "echo": WorkerConfig(kind="echo", models=("echo-1",)),
        "main": WorkerConfig(kind="openai", base_url="http://127.0.0.1:1", models=("gpt-x",), breaker=BreakerConfig(failure_threshold=1), fallback="echo"),
        "alone": WorkerConfig(kind="openai", base_url="http://127.0.0.1:1", breaker=BreakerConfig(failure_threshold=1)),
    }
)


def request(worker: str) -> PromptRequest:
    return PromptRequest(request_id=uuid.uuid4().hex, tenant_id="t", session_id="s", prompt="p", worker=worker, model="gpt-x", max_tokens=5)


def test_routing_while_open_goes_to_the_fallback_or_fails_fast(clean_breakers: None) -> None:
    assert gates._route_around_open_circuits(request("main"), CONFIG).worker == "main"
    gates.breaker_for(CONFIG, "main").record(success=False)
    rerouted = gates._route_around_open_circuits(request("main"), CONFIG)
    assert (rerouted.worker, rerouted.model) == ("echo", "echo-1")
    gates.breaker_for(CONFIG, "alone").record(success=False)
    with pytest.raises(CircuitOpen) as info:
        gates._route_around_open_circuits(request("alone"), CONFIG)
    assert info.value.data == {"worker": "alone", "state": "open"} and info.value.retry_after and info.value.retry_after > 0


def test_outcomes_are_recorded_by_kind(clean_breakers: None) -> None:
    def failing(exc: Exception) -> Any:
        def run(routed: PromptRequest) -> Any:
            raise exc

        return run

    with pytest.raises(WorkerAuthError):  # permanent: the provider is up
        gates.run_guarded(request("alone"), CONFIG, failing(WorkerAuthError()))
    assert gates.breaker_for(CONFIG, "alone").state() == BreakerState.CLOSED
    with pytest.raises(WorkerTimeout):  # transient: counts
        gates.run_guarded(request("alone"), CONFIG, failing(WorkerTimeout()))
    assert gates.breaker_for(CONFIG, "alone").state() == BreakerState.OPEN
    with pytest.raises(CircuitOpen):  # open, no fallback: refused before running
        gates.run_guarded(request("alone"), CONFIG, failing(AssertionError("must not run")))


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_end_to_end_failures_open_the_circuit_and_the_fallback_answers(
    owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes, clean_breakers: None
) -> None:
    fakes.openai.mode = "503"
    for _ in range(2):
        assert owner.client.post("/api/v1/infer", {"prompt": "hi", "worker": "flaky"}, format="json").status_code == 503
    calls = len(fakes.openai.requests)
    resp = owner.client.post("/api/v1/infer", {"prompt": "hello fallback", "worker": "flaky"}, format="json")
    assert resp.status_code == 200 and resp.json()["worker"] == "echo" and resp.json()["text"].startswith("hello fallback")
    assert len(fakes.openai.requests) == calls  # the failing provider was not called again


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_end_to_end_without_a_fallback_it_fails_fast(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes, clean_breakers: None) -> None:
    fakes.openai.mode = "500"
    assert owner.client.post("/api/v1/infer", {"prompt": "hi", "worker": "flaky_alone"}, format="json").status_code == 503
    calls = len(fakes.openai.requests)
    resp = owner.client.post("/api/v1/infer", {"prompt": "hi", "worker": "flaky_alone"}, format="json")
    error = resp.json()["error"]
    assert resp.status_code == 503 and error["code"] == "circuit_open" and int(resp["Retry-After"]) > 50
    assert len(fakes.openai.requests) == calls
