"""The lease keeper and the sweep (``services.leases``), in process against the real
Redis: what each decision of a lapsed lease does, and what a received or revoked
message does to its request."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from pipeline.config import LimitsConfig, PipelineSettings
from pipeline.resilience.local import shared_state
from pipeline.services import gates, leases, start
from pipeline.shared_redis import SharedRedis
from pipeline.tokenbus import TokenBus, fencing, get_bus, set_bus
from pipeline.tokenbus.fencing import LapseOutcome, Run
from tests.conftest import TenantFixture, begun_run, free_port, queue_request

CONFIG = PipelineSettings(limits=LimitsConfig(run_lease_s=0.6, queue_lease_s=5, max_runs=2))


@pytest.fixture
def config(pipeline_config: object) -> Iterator[PipelineSettings]:
    yield pipeline_config(CONFIG)  # type: ignore[operator]
    for run in leases.keeper.held():
        leases.keeper.release(run)


def lapse_now(request_id: str) -> None:
    get_bus().redis.client.zadd(get_bus().leases_key, {request_id: time.time() - 1})


def build(owner: TenantFixture, prompt: str = "p") -> object:
    return start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": prompt}, config=CONFIG)


@pytest.mark.django_db
def test_a_lapsed_request_is_published_again_as_its_next_attempt(owner: TenantFixture, config: PipelineSettings, unpublished: list) -> None:
    request = build(owner)
    request_id = queue_request(request)
    begun_run(get_bus(), request_id, payload=request.to_dict())  # type: ignore[attr-defined]
    lapse_now(request_id)
    with capture_logs() as logs:
        decided = leases.sweep(config, now=time.time())
    assert [(d.request_id, d.outcome, d.attempt) for d in decided if d.request_id == request_id] == [(request_id, LapseOutcome.REPUBLISH, 2)]
    assert (request_id, 2) in unpublished
    assert any(e["event"] == "lease_lapsed" and e["outcome"] == "republished" and e["attempt"] == 2 for e in logs)


@pytest.mark.django_db
def test_a_request_lost_after_its_tokens_gives_its_slot_and_claim_back(owner: TenantFixture, config: PipelineSettings) -> None:
    request = build(owner, "lost")
    request_id = queue_request(request)
    get_bus().set_record(request_id, dedup_key="the-key")
    shared = get_bus().redis
    assert gates.admission(config).acquire(request.tenant_id, request_id).admitted  # type: ignore[attr-defined]
    shared.client.set(f"{shared.prefix}:dedup:inflight:the-key", request_id)
    producer = begun_run(get_bus(), request_id, payload=request.to_dict())  # type: ignore[attr-defined]
    producer.publish_token(0, "half")
    lapse_now(request_id)
    decided = [d for d in leases.sweep(config) if d.request_id == request_id]
    assert [d.outcome for d in decided] == [LapseOutcome.LOST]
    assert gates.admission(config).in_flight(request.tenant_id) == 0  # type: ignore[attr-defined]
    assert not shared.client.exists(f"{shared.prefix}:dedup:inflight:the-key")  # an error is never served to another


@pytest.mark.django_db
def test_a_received_message_is_held_until_its_run_begins(owner: TenantFixture, config: PipelineSettings) -> None:
    request_id = queue_request(build(owner))
    fencing.lease_published(get_bus(), request_id, lease_s=0.5)
    leases.message_received(request_id, 1)
    assert Run(request_id, 1) in leases.keeper.held()
    assert leases.keeper.renew_now() >= 1
    assert (get_bus().redis.client.zscore(get_bus().leases_key, request_id) or 0) > time.time() + 0.5  # the run's lease now, not the queue's
    time.sleep(0.6)  # longer than the published lease: the keeper renewed it meanwhile
    assert request_id not in fencing.lapsed(get_bus(), now=time.time())
    leases.keeper.release(Run(request_id, 1))
    assert Run(request_id, 1) not in leases.keeper.held()


@pytest.mark.django_db
def test_a_revoked_message_fails_its_request_once(owner: TenantFixture, config: PipelineSettings) -> None:
    request = build(owner)
    request_id = queue_request(request)
    gates.admission(config).acquire(request.tenant_id, request_id)  # type: ignore[attr-defined]
    leases.message_received(request_id, 1)
    with capture_logs() as logs:
        leases.message_revoked(request_id)
        leases.message_revoked(request_id)  # a second worker's drop of it: nothing more
    assert [e["event"] for e in logs].count("request_revoked") == 1
    assert leases.keeper.held() == [] or all(r.request_id != request_id for r in leases.keeper.held())
    (error,) = get_bus().read_all(request_id)
    assert error.data["code"] == "request_cancelled" and get_bus().get_record(request_id)["status"] == "failed"
    assert gates.admission(config).in_flight(request.tenant_id) == 0  # type: ignore[attr-defined]


def test_releasing_a_message_leaves_a_run_of_the_same_request_alone() -> None:
    run = Run.new("shared", 2)
    leases.keeper.hold(run)
    leases.keeper.hold(Run("shared", 1))
    leases.keeper.release_messages_of("shared")
    leases.keeper.release(Run.new("shared", 2))  # another owner: not this one's to release
    assert leases.keeper.held() == [run]
    leases.keeper.release(run)
    assert leases.keeper.held() == []


@pytest.mark.django_db
def test_the_keeper_renews_from_its_own_thread(owner: TenantFixture, config: PipelineSettings) -> None:
    request = build(owner)
    producer = begun_run(get_bus(), queue_request(request), payload=request.to_dict())  # type: ignore[attr-defined]
    # A lease longer than the keeper's longest sleep (a third of the default 3 s, begun
    # before this test's config): at 0.3 s, a lease could lapse before the first renewal,
    # and the suite's worker's sweep take it (seen in CI under load).
    get_bus().redis.client.zadd(get_bus().leases_key, {producer.run.request_id: time.time() + 1.5})
    leases.keeper.hold(producer.run)
    try:
        time.sleep(2.5)  # past the lease it had: renewed meanwhile (every 0.2 s, once the keeper's current sleep ends)
        assert (get_bus().redis.client.zscore(get_bus().leases_key, producer.run.request_id) or 0) > time.time()
    finally:
        leases.keeper.release(producer.run)


def test_a_sweep_without_redis_is_logged_and_a_down_redis_is_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    set_bus(TokenBus(redis=SharedRedis(url=f"redis://127.0.0.1:{free_port()}/0", prefix="x", socket_timeout_s=0.3), maxlen=10, ttl_s=10))
    try:
        with capture_logs() as logs:
            leases.sweep_safely()
            shared_state.failed("a test", None)
            leases.sweep_safely()  # marked down: not even tried
    finally:
        set_bus(None)
        shared_state.reset()
    assert [e["event"] for e in logs if e["event"].startswith("lease_")] == ["lease_sweep_failed"]
