"""The per-process copies of the shared state follow the same rules as the Redis
ones (checked side by side against real Redis), and the switch between them
falls back, retries and restores as documented."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from orchestrator_site.errors import ServiceUnavailable
from pipeline.config import PipelineSettings
from pipeline.resilience.admission import Admission
from pipeline.resilience.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from pipeline.resilience.dedup import DedupStore
from pipeline.resilience.local import (
    LocalAdmission,
    LocalBreaker,
    LocalDedup,
    LocalRateLimiter,
    SharedState,
    WithFallback,
    shared_state,
)
from pipeline.resilience.ratelimit import RateLimiter, TenantRates
from tests.conftest import TenantFixture


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    yield client
    keys = client.keys("localparity*")
    if keys:
        client.delete(*keys)
    client.close()


def prefix() -> str:
    return f"localparity{uuid.uuid4().hex[:8]}"


# --- the switch ---------------------------------------------------------------------------


def down() -> str:
    raise ServiceUnavailable(data={"service": "redis"})


def test_a_failure_falls_back_warns_once_and_skips_redis_until_retry() -> None:
    clock = Clock()
    state = SharedState(retry_s=1.0, clock=clock)
    calls: list[str] = []

    def shared() -> str:
        calls.append("shared")
        return down()

    with capture_logs() as logs:
        assert state.run("check", shared, lambda: "local") == "local"
        assert state.degraded and not state.available()
        assert state.run("check", shared, lambda: "local") == "local"  # not tried again within retry_s
        assert calls == ["shared"]
        clock.now += 1.0
        assert state.available()
        assert state.run("check", shared, lambda: "local") == "local"  # tried, still down
        assert calls == ["shared", "shared"]
        clock.now += 1.0
        assert state.run("check", lambda: "shared", lambda: "local") == "shared"  # back
        assert not state.degraded
    events = [(e["event"], e.get("component")) for e in logs]
    assert events == [("shared_state_degraded", "redis"), ("shared_state_restored", "redis")]


def test_the_degraded_gauge_follows_the_state() -> None:
    from prometheus_client import REGISTRY

    state = SharedState(retry_s=0.0)
    state.run("x", down, lambda: None)
    assert REGISTRY.get_sample_value("orchestrator_degraded", {"component": "redis"}) == 1
    state.run("x", lambda: None, lambda: None)
    assert REGISTRY.get_sample_value("orchestrator_degraded", {"component": "redis"}) == 0


def test_with_fallback_passes_attributes_and_releases_on_both_sides() -> None:
    class Side:
        window_s = 60.0

        def __init__(self, fail: bool) -> None:
            self.fail = fail
            self.calls: list[str] = []

        def check(self) -> str:
            self.calls.append("check")
            return down() if self.fail else "shared"

        def release(self) -> None:
            self.calls.append("release")
            if self.fail:
                down()

    state = SharedState(retry_s=60.0)
    shared, local = Side(fail=False), Side(fail=False)
    both = WithFallback(shared, local, state)
    assert both.window_s == 60.0 and both.check() == "shared" and local.calls == []
    both.release()
    assert shared.calls[-1] == "release" and local.calls == ["release"]  # a slot taken locally is given back too
    shared.fail = True
    both.check()
    assert local.calls == ["release", "check"] and state.degraded


def test_the_suite_resets_the_process_wide_state_between_tests() -> None:
    assert shared_state.available() and not shared_state.degraded


# --- the same rules as in Redis -----------------------------------------------------------


@hsettings(max_examples=25, deadline=None)
@given(limit=st.integers(min_value=1, max_value=6), sent=st.integers(min_value=0, max_value=10))
def test_local_rate_limit_admits_what_redis_admits(limit: int, sent: int) -> None:
    shared_client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    shared = RateLimiter(shared_client, prefix=prefix())
    local = LocalRateLimiter()
    rates = TenantRates(requests_per_minute=limit)
    verdicts = [(shared.check("t", f"r{i}", rates).allowed, local.check("t", f"r{i}", rates).allowed) for i in range(sent)]
    assert [s for s, _ in verdicts] == [loc for _, loc in verdicts] and sum(s for s, _ in verdicts) == min(limit, sent)
    shared_client.close()


def test_local_rate_limit_window_tokens_and_forget() -> None:
    clock = Clock()
    local = LocalRateLimiter(window_s=60.0, clock=clock)
    rates = TenantRates(requests_per_minute=2, tokens_per_minute=100)
    assert local.check("t", "a", rates).allowed and local.check("t", "b", rates).allowed
    refused = local.check("t", "c", rates)
    assert refused.kind == "requests_per_minute" and refused.retry_after_s == 60.0
    local.forget("t", "b")
    assert local.check("t", "c", rates).allowed
    clock.now += 61
    local.record_tokens("t", "c", 100)
    local.record_tokens("t", "x", 0)  # nothing to record
    over = local.check("t", "d", rates)
    assert over.kind == "tokens_per_minute" and 0 < over.retry_after_s <= 60
    assert local.check("other", "e", rates).allowed  # tenants apart
    assert local.check("t", "f", TenantRates()).allowed  # no limit
    local.forget("nobody", "z")


def test_local_admission_sheds_like_redis(client: redis.Redis) -> None:
    shared = Admission(client, prefix=prefix(), max_global=3, max_per_tenant=2, lease_s=60)
    local = LocalAdmission(max_global=3, max_per_tenant=2, lease_s=60)
    steps = [("a", "1"), ("a", "2"), ("a", "3"), ("b", "4"), ("c", "5")]
    for tenant, rid in steps:
        assert shared.acquire(tenant, rid) == local.acquire(tenant, rid), (tenant, rid)
    assert shared.in_flight() == local.in_flight() == 3 and local.in_flight("a") == 2
    shared.release("a", "1")
    local.release("a", "1")
    assert shared.acquire("c", "6") == local.acquire("c", "6")


def test_local_admission_leases_expire() -> None:
    clock = Clock()
    local = LocalAdmission(max_global=1, max_per_tenant=1, lease_s=10, clock=clock)
    assert local.acquire("t", "1").admitted and not local.acquire("t", "2").admitted
    clock.now += 11  # the holder died without releasing
    assert local.acquire("t", "2").admitted


def test_local_dedup_serves_finished_results_within_the_window(client: redis.Redis) -> None:
    clock = Clock()
    local = LocalDedup(clock=clock).configure(window_s=30, max_entries=2)
    assert local.claim("k", "r1") == ("claimed", "r1")
    assert local.claim("k", "r2") == ("claimed", "r2")  # nothing is in flight locally: nobody could wait on it
    local.complete("k", json.dumps({"text": "x"}))
    assert local.claim("k", "r3") == ("done", '{"text": "x"}')
    local.abandon("k", "r3")  # errors are never cached; nothing to clear
    clock.now += 31
    assert local.claim("k", "r4") == ("claimed", "r4")
    for key in ("a", "b", "c"):
        local.complete(key, key)
    assert local.claim("a", "r5")[0] == "claimed" and local.claim("c", "r6") == ("done", "c")  # the oldest went first
    shared = DedupStore(client, prefix=prefix(), window_s=30, max_entries=2)
    assert shared.claim("k", "r1") == local.claim("new", "r1")  # both: claimed by the first
    shared.complete("k", "c")
    assert shared.claim("k", "r2") == local.claim("c", "r2") == ("done", "c")  # both: the finished result


@hsettings(max_examples=30, deadline=None)
@given(outcomes=st.lists(st.booleans(), max_size=12), threshold=st.integers(min_value=1, max_value=4))
def test_local_breaker_moves_through_the_same_states_as_redis(outcomes: list[bool], threshold: int) -> None:
    shared_client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    policy = BreakerPolicy(failure_threshold=threshold, open_s=0.0, half_open_trials=1)
    worker = f"w{uuid.uuid4().hex[:8]}"
    shared = CircuitBreaker(shared_client, prefix=prefix(), worker=worker, policy=policy)
    local = LocalBreaker(worker=worker, policy=policy)
    for success in outcomes:
        s_allow, l_allow = shared.allow(), local.allow()
        assert (s_allow.allowed, s_allow.state) == (l_allow.allowed, l_allow.state)
        if s_allow.allowed:
            assert shared.record(success=success) == local.record(success=success)
        assert shared.state() == local.state()
    shared_client.close()


def test_local_breaker_opens_and_half_opens_on_its_clock() -> None:
    clock = Clock()
    breaker = LocalBreaker(worker=f"w{uuid.uuid4().hex[:6]}", policy=BreakerPolicy(failure_threshold=2, open_s=30, half_open_trials=1), clock=clock)
    breaker.record(success=False)
    assert breaker.record(success=False) == BreakerState.OPEN
    refused = breaker.allow()
    assert not refused.allowed and refused.retry_after_s == 30
    clock.now += 30
    assert breaker.allow().state == BreakerState.HALF_OPEN
    assert not breaker.allow().allowed  # one trial at a time
    clock.now += 30  # the trial never reported
    assert breaker.allow().allowed
    assert breaker.record(success=True) == BreakerState.CLOSED


# --- wired into the services ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_with_redis_down_the_gateway_runs_the_request_itself(owner: TenantFixture, redis_down: None) -> None:
    resp = owner.client.post("/api/v1/infer", {"prompt": "still here", "session_id": "outage"}, format="json")
    assert resp.status_code == 200, resp.json()
    body = resp.json()
    assert body["text"].startswith("still here") and list(body["timings_us"]) == ["rag", "assemble", "inference", "post", "stream"]
    assert shared_state.degraded
    # "wait": false cannot be polled without Redis: it is answered at once.
    later = owner.client.post("/api/v1/infer", {"prompt": "no polling", "wait": False}, format="json")
    assert later.status_code == 200 and later.json()["status"] == "completed"


@pytest.mark.django_db(transaction=True)
def test_with_redis_down_limits_hold_per_process(owner: TenantFixture, redis_down: None, pipeline_config: object) -> None:
    from pipeline.models import Tenant

    Tenant.objects.filter(pk=owner.tenant.pk).update(requests_per_minute=2)
    codes = [owner.client.post("/api/v1/infer", {"prompt": f"p{i}"}, format="json").status_code for i in range(3)]
    assert codes == [200, 200, 429]


@pytest.mark.django_db(transaction=True)
def test_inline_failures_are_answered_and_counted_locally(owner: TenantFixture, redis_down: None, fakes: object) -> None:
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("orchestrator_pipeline_requests_total", {"worker": "openai", "outcome": "worker_auth_error"}) or 0
    fakes.openai.mode = "401"  # type: ignore[attr-defined]
    resp = owner.client.post("/api/v1/infer", {"prompt": "x", "worker": "openai"}, format="json")
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "worker_auth_error"
    assert REGISTRY.get_sample_value("orchestrator_pipeline_requests_total", {"worker": "openai", "outcome": "worker_auth_error"}) == before + 1
    # The breaker of this process counted nothing against the provider: it answered.
    assert LocalBreaker(worker="openai", policy=BreakerPolicy()).state() == BreakerState.CLOSED


@pytest.mark.django_db(transaction=True)
def test_inline_requests_are_deduplicated_within_the_process(owner: TenantFixture, redis_down: None, pipeline_config: object) -> None:
    from pipeline.config import DedupConfig

    pipeline_config(PipelineSettings(dedup=DedupConfig(enabled=True, window_s=30)))  # type: ignore[operator]
    first = owner.client.post("/api/v1/infer", {"prompt": "same", "session_id": "d"}, format="json").json()
    second = owner.client.post("/api/v1/infer", {"prompt": "same", "session_id": "d"}, format="json").json()
    assert second["request_id"] == first["request_id"] and second["text"] == first["text"]


def test_many_threads_failing_at_once_log_one_transition() -> None:
    import threading

    state = SharedState(retry_s=60.0)
    barrier = threading.Barrier(16)

    def fail() -> None:
        barrier.wait()
        state.run("check", down, lambda: "local")

    with capture_logs() as logs:
        threads = [threading.Thread(target=fail) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        state.reset()
        state.reset()  # already restored: nothing more to say
    assert [e["event"] for e in logs] == ["shared_state_degraded", "shared_state_restored"]


def test_local_admission_takes_new_bounds_from_the_config() -> None:
    local = LocalAdmission(max_global=1, max_per_tenant=1, lease_s=60)
    assert local.acquire("t", "1").admitted and not local.acquire("t", "2").admitted
    assert local.configure(max_global=5, max_per_tenant=2, lease_s=60) is local
    assert local.acquire("t", "2").admitted and local.acquire("t", "3") == local.acquire("t", "4")
    assert local.in_flight("t") == 2 and local.in_flight() == 2
