"""Per-tenant requests-per-minute and tokens-per-minute limits, atomic in Redis."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings

from orchestrator_site.errors import ServiceUnavailable
from pipeline.config import PipelineSettings, RateLimitConfig
from pipeline.models import Tenant
from pipeline.resilience.ratelimit import RateLimiter, TenantRates
from pipeline.services import gates, start
from pipeline.tokenbus import get_bus
from tests.conftest import TenantFixture, run_in_process


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.close()


def limiter(client: redis.Redis, window_s: float = 60.0) -> RateLimiter:
    return RateLimiter(client, prefix=f"rl{uuid.uuid4().hex[:8]}", window_s=window_s)


def test_exactly_n_requests_are_admitted_under_concurrency(client: redis.Redis) -> None:
    rl = limiter(client)
    allowed: list[bool] = []
    barrier = threading.Barrier(30)

    def one() -> None:
        barrier.wait()
        allowed.append(rl.check("t", uuid.uuid4().hex, TenantRates(requests_per_minute=10)).allowed)

    threads = [threading.Thread(target=one) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 10


def test_the_window_slides_and_retry_after_says_when(client: redis.Redis) -> None:
    rl = limiter(client, window_s=2.0)
    rates = TenantRates(requests_per_minute=2)
    assert rl.check("t", "a", rates).allowed and rl.check("t", "b", rates).allowed
    refused = rl.check("t", "c", rates)
    assert not refused.allowed and refused.kind == "requests_per_minute" and 0 < refused.retry_after_s <= 2.0
    time.sleep(refused.retry_after_s + 0.05)
    assert rl.check("t", "d", rates).allowed


def test_tenants_are_limited_apart(client: redis.Redis) -> None:
    rl = limiter(client)
    rates = TenantRates(requests_per_minute=1)
    assert rl.check("t1", "a", rates).allowed and not rl.check("t1", "b", rates).allowed
    assert rl.check("t2", "c", rates).allowed


def test_tokens_per_minute_counts_recorded_usage(client: redis.Redis) -> None:
    rl = limiter(client)
    rl.record_tokens("t", "r1", 60)
    rl.record_tokens("t", "r2", 40)
    rl.record_tokens("t", "r3", 0)  # nothing to record
    assert rl.check("t", "x", TenantRates(tokens_per_minute=150)).allowed
    refused = rl.check("t", "y", TenantRates(tokens_per_minute=100))
    assert not refused.allowed and refused.kind == "tokens_per_minute" and refused.retry_after_s > 59


def test_forget_gives_the_request_back(client: redis.Redis) -> None:
    rl = limiter(client)
    rates = TenantRates(requests_per_minute=1)
    assert rl.check("t", "a", rates).allowed
    rl.forget("t", "a")
    assert rl.check("t", "b", rates).allowed


def test_no_limit_means_no_redis_call_at_all() -> None:
    down = RateLimiter(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2), prefix="x")
    assert down.check("t", "a", TenantRates()).allowed
    with pytest.raises(ServiceUnavailable):
        down.check("t", "a", TenantRates(requests_per_minute=1))
    with pytest.raises(ServiceUnavailable):
        down.record_tokens("t", "a", 5)
    with pytest.raises(ServiceUnavailable):
        down.forget("t", "a")


@pytest.mark.django_db
def test_tenant_limits_override_the_defaults(owner: TenantFixture) -> None:
    config = PipelineSettings(rate_limits=RateLimitConfig(requests_per_minute=100, tokens_per_minute=5000))
    assert gates.tenant_rates(owner.tenant, config) == TenantRates(100, 5000)
    Tenant.objects.filter(pk=owner.tenant.pk).update(requests_per_minute=0, tokens_per_minute=42)
    owner.tenant.refresh_from_db()
    assert gates.tenant_rates(owner.tenant, config) == TenantRates(0, 42)


@pytest.fixture
def cleanup() -> Iterator[None]:
    yield
    bus = get_bus()
    keys = bus.redis.client.keys(f"{bus.prefix}:rate:*") + bus.redis.client.keys(f"{bus.prefix}:inflight*")
    if keys:
        bus.redis.client.delete(*keys)


@pytest.mark.django_db
def test_over_the_limit_is_429_with_retry_after_and_the_limit(owner: TenantFixture, outsider: TenantFixture, cleanup: None) -> None:
    Tenant.objects.filter(pk=owner.tenant.pk).update(requests_per_minute=2)
    for _ in range(2):
        assert owner.client.post("/api/v1/infer", {"prompt": "p", "wait": False}, format="json").status_code == 202
    resp = owner.client.post("/api/v1/infer", {"prompt": "p", "wait": False}, format="json")
    error = resp.json()["error"]
    assert resp.status_code == 429 and error["code"] == "rate_limited" and 1 <= int(resp["Retry-After"]) <= 60
    assert error["data"]["limit"] == 2 and error["data"]["kind"] == "requests_per_minute" and error["data"]["window_s"] == 60
    assert outsider.client.post("/api/v1/infer", {"prompt": "p", "wait": False}, format="json").status_code == 202


@pytest.mark.django_db
def test_token_limit_refuses_once_usage_reaches_it(owner: TenantFixture, cleanup: None) -> None:
    Tenant.objects.filter(pk=owner.tenant.pk).update(tokens_per_minute=50)
    gates.rate_limiter().record_tokens(str(owner.tenant.id), "earlier", 50)
    resp = owner.client.post("/api/v1/infer", {"prompt": "p"}, format="json")
    assert resp.status_code == 429 and resp.json()["error"]["data"]["kind"] == "tokens_per_minute"


@pytest.mark.django_db
def test_a_shed_request_is_not_counted_against_the_tenant(owner: TenantFixture, cleanup: None, pipeline_config: object) -> None:
    from pipeline.config import LimitsConfig

    pipeline_config(PipelineSettings(limits=LimitsConfig(max_inflight_per_tenant=1)))  # type: ignore[operator]
    Tenant.objects.filter(pk=owner.tenant.pk).update(requests_per_minute=2)
    gates.admission().acquire(str(owner.tenant.id), "holding")
    for _ in range(3):
        assert owner.client.post("/api/v1/infer", {"prompt": "p"}, format="json").status_code == 503
    gates.admission().release(str(owner.tenant.id), "holding")
    assert owner.client.post("/api/v1/infer", {"prompt": "p", "wait": False}, format="json").status_code == 202


@pytest.mark.django_db(transaction=True)
def test_completed_requests_record_their_tokens(owner: TenantFixture, cleanup: None) -> None:
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "count my tokens"}, config=PipelineSettings())
    run_in_process(request)
    members = get_bus().redis.client.zrange(f"{get_bus().prefix}:rate:tok:{owner.tenant.id}", 0, -1)
    used = get_bus().read_all(request.request_id)[-1].data["usage"]["total_tokens"]
    assert used > 0 and members == [f"{request.request_id}:{used}"]
