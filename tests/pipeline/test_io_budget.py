"""Deterministic cost gate: SQL queries and Redis round trips per real-time request.

Unlike timings, these counts do not depend on how busy the machine is, so a
regression is caught exactly. The budget lives in benchmarks/io_budget.json;
a change that needs more must raise it there, in review. The worker's Redis
count is 4 round trips per request plus one per publish: pieces that arrive
together go out in one, after the first piece, which goes out alone (the echo
reply's 8 pieces come in one burst: two publishes, 6). The task's start is one of
them: the status marked running and the worker's breaker asked by one script. So
is its settle: the done event and status, the deduplication window, the token
log and the slot's release, one pipeline. Its SQL is two statements' round trips:
the search with the session's turns (``selectors.document_search_ahead``),
and the new turns stored. The gateway's start of a request on
its event loop is one: the start script, which pushes the task's message too
(the suite's broker is another database of the bus's server).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis.asyncio.connection as aioredis_connection
import redis.connection
from django.db import connection
from django.test.utils import CaptureQueriesContext

from pipeline import selectors, services
from pipeline.config import PipelineSettings
from pipeline.tokenbus import get_bus
from pipeline.types import PromptRequest
from tests.conftest import ROOT, OwnBroker, TenantFixture

BUDGET = json.loads((ROOT / "benchmarks" / "io_budget.json").read_text())
TOLERANCE = 0.10


@contextmanager
def redis_round_trips() -> Iterator[list[int]]:
    """Counts what the sync Redis client sends: a pipeline is one round trip."""
    counter = [0]
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: redis.connection.AbstractConnection, command: object, check_health: bool = True) -> None:
        counter[0] += 1
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
    get_bus().client.ping()  # connect outside the measurement
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
def request_payload(owner: TenantFixture) -> Callable[[], dict]:
    def build() -> dict:
        request = services.infer_build_request(
            tenant_id=str(owner.tenant.id), data={"prompt": "refund policy?", "session_id": "budget"}, config=PipelineSettings()
        )
        get_bus().set_status(request.request_id, tenant_id=request.tenant_id, status="queued")
        return request.to_dict()

    return build


@pytest.mark.django_db(transaction=True)
def test_worker_side_of_a_request_stays_within_budget(request_payload: Callable[[], dict]) -> None:
    services.realtime_execute(request_payload())  # warm: first-use connections, config
    counts = measure(lambda: services.realtime_execute(request_payload()))
    assert over_budget("realtime_execute", counts) == [], counts
    assert counts == BUDGET["realtime_execute"], f"counts changed to {counts}: update benchmarks/io_budget.json if intended"


@pytest.mark.django_db(transaction=True)
def test_gateway_submit_stays_within_budget(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.tasks import run_realtime

    monkeypatch.setattr(run_realtime, "apply_async", lambda **_: None)  # the broker publish is kombu's, counted apart

    def build() -> PromptRequest:
        return services.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "p"}, config=PipelineSettings())

    # Warm: on a Redis that has not seen the limiter's and admission's Lua scripts yet,
    # their first EVALSHA fails and loads them (seen once: 4 round trips, not 2).
    services.infer_submit(request=build())
    request = build()
    counts = measure(lambda: services.infer_submit(request=request))
    assert over_budget("infer_submit", counts) == [] and counts == BUDGET["infer_submit"], counts


@pytest.mark.django_db(transaction=True)
def test_gateway_start_on_the_event_loop_stays_within_budget(owner: TenantFixture, own_broker: OwnBroker) -> None:
    prompts = iter(("first", "second"))  # deduplication is on: two different requests, both run

    def build() -> PromptRequest:
        return services.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": next(prompts), "session_id": "budget"}, config=PipelineSettings())

    loop = asyncio.new_event_loop()  # one loop: its connections are made while warming
    try:
        loop.run_until_complete(services.ainfer_start(request=build()))  # warm: connections, the script loaded
        with async_redis_round_trips() as trips, redis_round_trips() as sync_trips, CaptureQueriesContext(connection) as queries:
            loop.run_until_complete(services.ainfer_start(request=build()))
    finally:
        loop.close()
    counts = {"sql": len(queries.captured_queries), "redis": trips[0] + sync_trips[0]}
    assert len(own_broker.messages()) == 2  # both published, on the broker's list
    assert over_budget("ainfer_start", counts) == [] and counts == BUDGET["ainfer_start"], counts


@pytest.mark.django_db(transaction=True)
def test_the_gate_catches_an_extra_query(request_payload: Callable[[], dict], monkeypatch: pytest.MonkeyPatch) -> None:
    original = selectors.document_search_ahead

    def chatty(**kwargs: Any) -> Any:
        original(**kwargs)  # an N+1 slipped in: the same query twice
        return original(**kwargs)

    monkeypatch.setattr(selectors, "document_search_ahead", chatty)
    services.realtime_execute(request_payload())
    counts = measure(lambda: services.realtime_execute(request_payload()))
    assert over_budget("realtime_execute", counts), counts


@pytest.mark.django_db(transaction=True)
def test_the_gate_catches_an_extra_redis_round_trip(request_payload: Callable[[], dict], monkeypatch: pytest.MonkeyPatch) -> None:
    bus = get_bus()

    def unbatched(request_id: str, event_type: str, data: dict, *, status: str) -> None:
        # One round trip per command instead of one pipeline.
        bus.client.xadd(bus.stream_key(request_id), {"type": event_type, "data": json.dumps(data)})
        bus.client.expire(bus.stream_key(request_id), bus.ttl_s)
        bus.client.hset(bus.status_key(request_id), "status", status)
        bus.client.expire(bus.status_key(request_id), bus.ttl_s)

    monkeypatch.setattr(bus, "finish", unbatched)
    services.realtime_execute(request_payload())
    counts = measure(lambda: services.realtime_execute(request_payload()))
    assert over_budget("realtime_execute", counts), counts
