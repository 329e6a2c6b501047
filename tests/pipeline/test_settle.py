"""A finished run's settle (``services.execute``): the terminal event and status under
fencing, then the bookkeeping (the deduplication window, the tenant's token log, the
slot's release) in one pipeline, against the real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from pipeline import metrics
from pipeline.config import DedupConfig, PipelineSettings
from pipeline.resilience import dedup, ratelimit
from pipeline.resilience.local import shared_state
from pipeline.services import execute, gates, start
from pipeline.tokenbus import get_bus
from pipeline.tokenbus.fencing import Run
from pipeline.tokenbus.producer import Producer
from pipeline.types import PipelineResult, PromptRequest, Usage
from tests.conftest import TenantFixture, begun_run, delete_redis_keys, queue_request, run_in_process
from tests.pipeline.test_io_budget import redis_round_trips

CONFIG = PipelineSettings(dedup=DedupConfig(enabled=True, window_s=30))


@pytest.fixture(autouse=True)
def clean(pipeline_config: object) -> Iterator[None]:
    pipeline_config(CONFIG)  # type: ignore[operator]
    yield
    shared_state.reset()
    delete_redis_keys("dedup:*", "rate:*")


def started(owner: TenantFixture, prompt: str) -> tuple[PromptRequest, str, Producer]:
    """A request as a run holds it: admitted (its slot taken), owning its deduplication
    key, and begun by the run whose producer this is."""
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": prompt}, config=CONFIG)
    key = dedup.dedup_key(request)
    assert gates.admission(CONFIG).acquire(request.tenant_id, request.request_id).admitted
    assert gates.dedup_store(CONFIG).claim(key, request.request_id) == ("claimed", request.request_id)
    queue_request(request)
    producer = begun_run(get_bus(), request.request_id, payload=request.to_dict())
    return request, key, producer


def result_of(request: PromptRequest) -> PipelineResult:
    return PipelineResult(
        request_id=request.request_id,
        session_id=request.session_id,
        text="the answer",
        worker=request.worker,
        model=request.model,
        finish_reason="stop",
        usage=Usage(prompt_tokens=3, completion_tokens=4),
        timings_us={"rag": 1, "assemble": 1, "inference": 1, "post": 1, "stream": 1},
    )


@pytest.mark.django_db
def test_the_answer_then_its_bookkeeping_are_two_round_trips(owner: TenantFixture) -> None:
    request, key, producer = started(owner, "settle me")
    bus = get_bus()
    bus.redis.client.ping()
    clock = metrics.StreamClock(request.worker, accepted_at=None)
    with redis_round_trips() as trips:
        execute._settle_success(producer, request, result_of(request), clock, key, CONFIG)
    assert trips[0] == 2
    [event] = bus.read_all(request.request_id)
    assert event.type == "done" and event.data["text"] == "the answer" and bus.get_record(request.request_id)["status"] == "completed"
    inflight, done, _index = dedup.keys(bus.prefix, key)
    assert not bus.redis.client.exists(inflight) and json.loads(bus.redis.client.get(done))["text"] == "the answer"  # the window answers the next one
    assert bus.redis.client.zrange(ratelimit.keys(bus.prefix, request.tenant_id)[1], 0, -1) == [f"{request.request_id}:7"]
    assert gates.admission(CONFIG).in_flight(request.tenant_id) == 0


@pytest.mark.django_db
def test_a_request_without_deduplication_settles_the_rest(owner: TenantFixture) -> None:
    request, key, producer = started(owner, "no window")
    execute._settle_success(producer, request, result_of(request), metrics.StreamClock(request.worker, accepted_at=None), None, CONFIG)
    bus = get_bus()
    assert bus.redis.client.get(dedup.keys(bus.prefix, key)[0]) == request.request_id  # not this settle's to touch
    assert gates.admission(CONFIG).in_flight(request.tenant_id) == 0


@pytest.mark.django_db
def test_a_run_fenced_out_settles_nothing(owner: TenantFixture) -> None:
    """Another run answers: this one's answer, tokens and slot are not its to settle."""
    request, key, _producer = started(owner, "fenced")
    stale = Producer(get_bus(), Run.new(request.request_id, 1))
    execute._settle_success(stale, request, result_of(request), metrics.StreamClock(request.worker, accepted_at=None), key, CONFIG)
    bus = get_bus()
    assert bus.read_all(request.request_id) == [] and bus.get_record(request.request_id)["status"] == "running"
    assert gates.admission(CONFIG).in_flight(request.tenant_id) == 1
    gates.admission(CONFIG).release(request.tenant_id, request.request_id)


@pytest.mark.django_db
def test_bookkeeping_redis_refuses_is_left_to_the_leases(owner: TenantFixture) -> None:
    """The answer is out; a failing bookkeeping round trip marks Redis down and raises nothing."""
    request, key, _producer = started(owner, "late bookkeeping")
    get_bus().redis.client.set(dedup.keys(get_bus().prefix, key)[2], "not a sorted set")  # the window's index: a WRONGTYPE error
    try:
        execute._bookkeeping(request, CONFIG, key=key, result_json="{}", tokens=1)
        assert not shared_state.available()
    finally:
        get_bus().redis.client.delete(dedup.keys(get_bus().prefix, key)[2])
        gates.admission(CONFIG).release(request.tenant_id, request.request_id)


@pytest.mark.django_db(transaction=True)
def test_a_run_releases_its_slot_once_shared_and_locally(owner: TenantFixture) -> None:
    """A slot taken in this process's own count (during an outage) is released with the
    answer too, as ``WithFallback`` releases both; the shared one by the settle."""
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "both"}, config=CONFIG)
    local = gates.local_admission(CONFIG)
    assert local.acquire(request.tenant_id, request.request_id).admitted
    assert gates.admission(CONFIG).acquire(request.tenant_id, request.request_id).admitted
    run_in_process(request)
    assert get_bus().read_all(request.request_id)[-1].type == "done"
    assert local.in_flight(request.tenant_id) == 0 and gates.admission(CONFIG).in_flight(request.tenant_id) == 0
