"""Deduplication: identical requests in flight share one upstream call; finished answers
are served again within the window; errors are never shared."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings

from pipeline.config import PipelineSettings
from pipeline.resilience.dedup import DedupStore, dedup_key
from pipeline.resilience.ratelimit import TenantRates
from pipeline.services import execute, start
from pipeline.services.start import StartKind
from pipeline.tokenbus import get_bus
from pipeline.types import PromptRequest
from tests.conftest import Fakes, TenantFixture, WorkerProcess, start_request


@pytest.fixture
def store() -> Iterator[DedupStore]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield DedupStore(client, prefix=f"dd{uuid.uuid4().hex[:8]}", window_s=2, max_entries=3)
    client.close()


def test_first_claims_next_attaches_then_the_answer_is_served(store: DedupStore) -> None:
    assert store.claim("k", "r1") == ("claimed", "r1")
    assert store.claim("k", "r2") == ("inflight", "r1")
    store.complete("k", '{"text": "answer"}')
    assert store.claim("k", "r3") == ("done", '{"text": "answer"}')


def test_an_abandoned_claim_is_free_again_and_only_its_owner_abandons(store: DedupStore) -> None:
    store.claim("k", "r1")
    store.abandon("k", "someone-else")
    assert store.claim("k", "r2") == ("inflight", "r1")
    store.abandon("k", "r1")
    assert store.claim("k", "r3") == ("claimed", "r3")


def test_answers_expire_with_the_window(store: DedupStore) -> None:
    store.claim("k", "r1")
    store.complete("k", "{}")
    time.sleep(2.1)
    assert store.claim("k", "r2") == ("claimed", "r2")


def test_at_most_max_entries_answers_are_kept_oldest_first_out(store: DedupStore) -> None:
    for n in range(5):
        store.claim(f"k{n}", f"r{n}")
        store.complete(f"k{n}", json.dumps({"n": n}))
        time.sleep(0.01)
    kinds = [store.claim(f"k{n}", f"again{n}")[0] for n in range(5)]
    assert kinds == ["claimed", "claimed", "done", "done", "done"]


def test_concurrent_claims_elect_exactly_one_owner(store: DedupStore) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(20)

    def one(n: int) -> None:
        barrier.wait()
        outcomes.append(store.claim("same", f"r{n}")[0])

    threads = [threading.Thread(target=one, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("claimed") == 1 and outcomes.count("inflight") == 19


def build(tenant: TenantFixture, prompt: str, config: PipelineSettings, worker: str = "echo") -> PromptRequest:
    return start.infer_build_request(tenant_id=str(tenant.tenant.id), data={"prompt": prompt, "worker": worker, "session_id": "dd"}, config=config)


@pytest.mark.django_db(transaction=True)
def test_a_finished_answer_is_served_from_the_window(owner: TenantFixture, dedup_on: PipelineSettings, unpublished: list[tuple[str, int]]) -> None:
    first = build(owner, "same question", dedup_on)
    assert start_request(first).kind is StartKind.SUBMITTED
    execute.realtime_execute(*unpublished[0])  # the worker's side, in process
    again = start_request(build(owner, "same question", dedup_on))
    assert again.kind is StartKind.CACHED and again.result is not None and again.request_id == first.request_id
    assert unpublished == [(first.request_id, 1)]  # one upstream run for two requests
    assert start_request(build(owner, "another question", dedup_on)).kind is StartKind.SUBMITTED


@pytest.mark.django_db(transaction=True)
def test_an_identical_request_in_flight_is_attached_to_its_stream(owner: TenantFixture, dedup_on: PipelineSettings, unpublished: list[tuple[str, int]]) -> None:
    first = build(owner, "in flight", dedup_on)
    start_request(first)
    attached = start_request(build(owner, "in flight", dedup_on))
    assert (attached.kind, attached.request_id) == (StartKind.ATTACHED, first.request_id) and len(unpublished) == 1


@pytest.mark.django_db(transaction=True)
def test_errors_are_not_shared(owner: TenantFixture, dedup_on: PipelineSettings, monkeypatch: pytest.MonkeyPatch, unpublished: list[tuple[str, int]]) -> None:
    from orchestrator_site.errors import WorkerTimeout
    from pipeline.routing import worker_pool

    class Slow:
        name, supports_streaming = "echo", False

        def infer(self, prompt: object) -> object:
            raise WorkerTimeout()

    monkeypatch.setattr(worker_pool, "get", lambda config, name: Slow())
    first = build(owner, "doomed", dedup_on)
    start_request(first)
    execute.realtime_execute(*unpublished[0])
    assert start_request(build(owner, "doomed", dedup_on)).kind is StartKind.SUBMITTED


@pytest.mark.django_db(transaction=True)
def test_a_refused_start_gives_the_claim_back(owner: TenantFixture, dedup_on: PipelineSettings, unpublished: list[tuple[str, int]]) -> None:
    from orchestrator_site.errors import RateLimited

    shared = get_bus().redis
    shared.client.zadd(f"{shared.prefix}:rate:req:{owner.tenant.id}", {"earlier": time.time()})  # the minute's one request
    with pytest.raises(RateLimited):
        start_request(build(owner, "q", dedup_on), TenantRates(requests_per_minute=1))
    assert start_request(build(owner, "q", dedup_on)).kind is StartKind.SUBMITTED  # the claim was not left behind


@pytest.mark.django_db
def test_tenants_never_share_answers(owner: TenantFixture, outsider: TenantFixture, dedup_on: PipelineSettings) -> None:
    assert dedup_key(build(owner, "q", dedup_on)) != dedup_key(build(outsider, "q", dedup_on))


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_identical_concurrent_requests_make_one_upstream_call(
    owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes, dedup_on: PipelineSettings
) -> None:
    from tests.orchestrator_site.test_gateway import SlowReplies

    results: list[dict] = []
    lock = threading.Lock()

    def one() -> None:
        from rest_framework.test import APIClient

        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {owner.key}")
        try:
            resp = client.post("/api/v1/infer", {"prompt": "shared", "worker": "openai", "session_id": "dd"}, format="json")
            with lock:
                results.append(resp.json())
        finally:
            from django.db import connections

            connections.close_all()  # the test client keeps this thread's connection checked out

    before = len(fakes.openai.requests)
    with SlowReplies(fakes, 0.5):  # the first call is still running when the others arrive
        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(fakes.openai.requests) - before == 1
    assert len({r["request_id"] for r in results}) == 1 and {r["text"] for r in results} == {"Hello, world!"}
