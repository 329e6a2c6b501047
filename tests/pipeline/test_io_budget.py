"""Deterministic cost gate: SQL queries and Redis round trips per real-time request.

Unlike timings, these counts do not depend on how busy the machine is, so a
regression is caught exactly. The budget lives in benchmarks/io_budget.json;
a change that needs more must raise it there, in review.

A run in the worker (``realtime_execute``) makes 5 Redis round trips plus one per
publish (pieces that arrive together go out in one, after the first piece, which
goes out alone: the echo reply's 8 pieces come in one burst, two publishes): the
attempt begun, the breaker asked, the breaker told, the answer settled under
fencing, then its bookkeeping (deduplication window, token log, slot released),
one pipeline after the client has its answer. Its SQL is three round trips: the
search, the session's turns, the new turns stored. The gateway's start is two:
the start script, and the lease once Celery's publish (kombu's own, not counted
here) has put the message on the broker. Only the calling thread's round trips
count: the lease keeper renews from a thread of its own.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis.asyncio.connection as aioredis_connection
import redis.connection
from django.db import connection
from django.test.utils import CaptureQueriesContext

from pipeline import selectors
from pipeline.config import PipelineSettings
from pipeline.services import execute, start
from pipeline.tokenbus import RequestStatus, get_bus
from pipeline.tokenbus.producer import Producer
from pipeline.types import PromptRequest
from tests.conftest import ROOT, TenantFixture, queue_request

BUDGET = json.loads((ROOT / "benchmarks" / "io_budget.json").read_text())
TOLERANCE = 0.10


@contextmanager
def redis_round_trips(*, every_thread: bool = False) -> Iterator[list[int]]:
    """Counts what the sync Redis client sends from this thread (or from every thread):
    a pipeline is one round trip."""
    counter = [0]
    original = redis.connection.AbstractConnection.send_packed_command
    caller = threading.get_ident()

    def counting(self: redis.connection.AbstractConnection, command: object, check_health: bool = True) -> None:
        counter[0] += every_thread or threading.get_ident() == caller
        return original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        redis.connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


@contextmanager
def async_redis_round_trips() -> Iterator[list[int]]:
    """Counts what the asyncio Redis clients send (the gateway's event loop)."""
    counter = [0]
    original = aioredis_connection.AbstractConnection.send_packed_command

    async def counting(self: aioredis_connection.AbstractConnection, command: object, check_health: bool = True) -> None:
        counter[0] += 1
        return await original(self, command, check_health)  # type: ignore[arg-type]

    aioredis_connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        aioredis_connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def measure(fn: Callable[[], object]) -> dict[str, int]:
    get_bus().redis.client.ping()  # connect outside the measurement
    with CaptureQueriesContext(connection) as queries, redis_round_trips() as trips:
        fn()
    return {"sql": len(queries.captured_queries), "redis": trips[0]}


def over_budget(name: str, counts: dict[str, int]) -> list[str]:
    allowed = BUDGET[name]
    return [
        f"{name}: {kind} {counts[kind]} > budget {allowed[kind]} (+{TOLERANCE:.0%})"
        for kind in ("sql", "redis")
        if counts[kind] > allowed[kind] * (1 + TOLERANCE)
    ]


@pytest.fixture(autouse=True)
def default_config(pipeline_config: Callable[[PipelineSettings], PipelineSettings]) -> None:
    """The budget is for the default pipeline (dedup on), whatever config ran before."""
    pipeline_config(PipelineSettings())


@pytest.fixture
def queued(owner: TenantFixture) -> Callable[[], str]:
    def build() -> str:
        request = start.infer_build_request(
            tenant_id=str(owner.tenant.id), data={"prompt": "refund policy?", "session_id": "budget"}, config=PipelineSettings()
        )
        return queue_request(request)

    return build


@pytest.mark.django_db(transaction=True)
def test_worker_side_of_a_request_stays_within_budget(queued: Callable[[], str]) -> None:
    execute.realtime_execute(queued(), 1)  # warm: first-use connections, config, scripts
    request_id = queued()
    counts = measure(lambda: execute.realtime_execute(request_id, 1))
    assert over_budget("realtime_execute", counts) == [], counts
    assert counts == BUDGET["realtime_execute"], f"counts changed to {counts}: update benchmarks/io_budget.json if intended"


@pytest.mark.django_db(transaction=True)
def test_gateway_start_stays_within_budget(owner: TenantFixture, unpublished: list[tuple[str, int]]) -> None:
    prompts = iter(("first", "second"))  # deduplication is on: two different requests, both run

    def build() -> PromptRequest:
        return start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": next(prompts), "session_id": "budget"}, config=PipelineSettings())

    def lease_started(request_id: str) -> int:
        polls = 1
        while get_bus().redis.client.zscore(get_bus().leases_key, request_id) is None:  # started meanwhile, in the publishing thread
            polls += 1
            time.sleep(0.001)
        return polls

    loop = asyncio.new_event_loop()  # one loop: its connections are made while warming
    try:
        warm = build()
        loop.run_until_complete(start.ainfer_start(request=warm))  # warm: connections (both threads'), the script loaded
        lease_started(warm.request_id)
        # Every thread's: the lease is started from the thread that published.
        with async_redis_round_trips() as trips, redis_round_trips(every_thread=True) as sync_trips, CaptureQueriesContext(connection) as queries:
            request = build()
            loop.run_until_complete(start.ainfer_start(request=request))
            polls = lease_started(request.request_id)
    finally:
        loop.close()
    counts = {"sql": len(queries.captured_queries), "redis": trips[0] + sync_trips[0] - polls}
    assert len(unpublished) == 2  # both published
    assert over_budget("ainfer_start", counts) == [] and counts == BUDGET["ainfer_start"], counts


@pytest.mark.django_db(transaction=True)
def test_the_gate_catches_an_extra_query(queued: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> None:
    original = selectors.document_search

    def chatty(**kwargs: Any) -> Any:
        original(**kwargs)  # an N+1 slipped in: the same query twice
        return original(**kwargs)

    monkeypatch.setattr(selectors, "document_search", chatty)
    execute.realtime_execute(queued(), 1)
    request_id = queued()
    counts = measure(lambda: execute.realtime_execute(request_id, 1))
    assert over_budget("realtime_execute", counts), counts


@pytest.mark.django_db(transaction=True)
def test_the_gate_catches_an_extra_redis_round_trip(queued: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> None:
    original = Producer.finish

    def unbatched(self: Producer, event_type: str, data: dict, *, status: RequestStatus) -> bool:
        self.wanted()  # a round trip the settle does not need
        self.wanted()
        return original(self, event_type, data, status=status)

    monkeypatch.setattr(Producer, "finish", unbatched)
    execute.realtime_execute(queued(), 1)
    request_id = queued()
    counts = measure(lambda: execute.realtime_execute(request_id, 1))
    assert over_budget("realtime_execute", counts), counts
