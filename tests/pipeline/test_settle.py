"""A finished request's settle (``services._answer``): the ``done`` event and status,
then its bookkeeping (the deduplication window, the tenant's token log, the slot's
release) in the same pipeline, against the real Redis; and through each store's
fallback while Redis is marked down."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from pipeline import services
from pipeline.config import DedupConfig, PipelineSettings
from pipeline.resilience import dedup, ratelimit
from pipeline.resilience.local import shared_state
from pipeline.tokenbus import get_bus
from pipeline.types import PipelineResult, PromptRequest, Usage
from tests.conftest import TenantFixture, delete_redis_keys
from tests.pipeline.test_io_budget import redis_round_trips

CONFIG = PipelineSettings(dedup=DedupConfig(enabled=True, window_s=30))


@pytest.fixture(autouse=True)
def clean(pipeline_config: object) -> Iterator[None]:
    pipeline_config(CONFIG)  # type: ignore[operator]
    yield
    shared_state.reset()
    delete_redis_keys("dedup:*", "rate:*")


def started(owner: TenantFixture, prompt: str) -> tuple[PromptRequest, str]:
    """A request as a worker holds it: admitted (its slot taken) and owning its deduplication key."""
    request = services.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": prompt}, config=CONFIG)
    key = dedup.dedup_key(request)
    assert services.admission(CONFIG).acquire(request.tenant_id, request.request_id).admitted
    assert services.dedup_store(CONFIG).claim(key, request.request_id) == ("claimed", request.request_id)
    return request, key


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
def test_the_answer_and_its_bookkeeping_are_one_round_trip(owner: TenantFixture) -> None:
    request, key = started(owner, "settle me")
    bus = get_bus()
    bus.client.ping()
    with redis_round_trips() as trips:
        released = services._answer(request, result_of(request), key, CONFIG)
    assert released and trips[0] == 1
    [event] = bus.read_all(request.request_id)
    assert event.type == "done" and event.data["text"] == "the answer" and bus.get_status(request.request_id)["status"] == "completed"
    inflight, done, _index = dedup.keys(bus.prefix, key)
    assert not bus.client.exists(inflight) and json.loads(bus.client.get(done))["text"] == "the answer"  # the window answers the next one
    assert bus.client.zrange(ratelimit.keys(bus.prefix, request.tenant_id)[1], 0, -1) == [f"{request.request_id}:7"]
    assert services.admission(CONFIG).in_flight(request.tenant_id) == 0


@pytest.mark.django_db
def test_a_request_without_deduplication_settles_the_rest(owner: TenantFixture) -> None:
    request, key = started(owner, "no window")
    assert services._answer(request, result_of(request), None, CONFIG)
    bus = get_bus()
    assert bus.client.get(dedup.keys(bus.prefix, key)[0]) == request.request_id  # not this settle's to touch
    assert services.admission(CONFIG).in_flight(request.tenant_id) == 0


@pytest.mark.django_db
def test_while_redis_is_marked_down_the_bookkeeping_goes_through_the_fallbacks(owner: TenantFixture) -> None:
    """The stores' own fallbacks decide, as they do outside a settle: the answer goes
    to this process's window, and the slot is left to the caller's release."""
    request, key = started(owner, "degraded")
    shared_state.failed("a test", None)
    assert not shared_state.available()
    assert services._answer(request, result_of(request), key, CONFIG) is False
    assert get_bus().read_all(request.request_id)[-1].type == "done"
    assert services._local_dedup.claim(key, "someone else")[0] == "done"


@pytest.mark.django_db
def test_a_task_releases_its_slot_once_shared_and_locally(owner: TenantFixture) -> None:
    """A slot taken in this process's own count (during an outage) is released with the
    answer too, as ``WithFallback`` releases both; the shared one by the settle."""
    request = services.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "both"}, config=CONFIG)
    max_global, max_per_tenant, lease_s = services.admission_bounds(CONFIG)
    local = services._local_admission.configure(max_global=max_global, max_per_tenant=max_per_tenant, lease_s=lease_s)
    assert local.acquire(request.tenant_id, request.request_id).admitted
    assert services.admission(CONFIG).acquire(request.tenant_id, request.request_id).admitted
    get_bus().set_status(request.request_id, tenant_id=request.tenant_id, status="queued", created_at=f"{time.time():.6f}")
    services.realtime_execute(request.to_dict())
    assert get_bus().read_all(request.request_id)[-1].type == "done"
    assert local.in_flight(request.tenant_id) == 0 and services.admission(CONFIG).in_flight(request.tenant_id) == 0
