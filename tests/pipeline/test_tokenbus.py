"""The token bus against the real Redis: streams, status, TTLs, readers, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from orchestrator_site.errors import ServiceUnavailable
from pipeline.tokenbus import BusEvent, TokenBus, get_bus
from tests.conftest import free_port, scratch_bus


@pytest.fixture
def bus() -> Iterator[TokenBus]:
    with scratch_bus("bustest", maxlen=50) as bus:
        yield bus


def read(bus: TokenBus, request_id: str, after: str = "0-0", timeout_s: float = 2.0) -> list[BusEvent]:
    async def run() -> list[BusEvent]:
        return [e async for e in bus.events(request_id, after=after, timeout_s=timeout_s)]

    return asyncio.run(run())


def test_events_are_read_in_order_up_to_the_terminal_one(bus: TokenBus) -> None:
    for i in range(3):
        bus.publish("r", "token", {"seq": i, "text": f"t{i}"})
    bus.publish("r", "done", {"ok": True})
    bus.publish("r", "token", {"seq": 99})  # after done: never read
    events = read(bus, "r")
    assert [e.type for e in events] == ["token", "token", "token", "done"]
    assert [e.data.get("seq") for e in events[:3]] == [0, 1, 2]


def test_a_reader_resumes_after_an_id(bus: TokenBus) -> None:
    first = bus.publish("r", "token", {"seq": 0})
    bus.publish("r", "error", {"code": "worker_timeout"})
    events = read(bus, "r", after=first)
    assert [e.type for e in events] == ["error"]


def test_a_reader_waits_for_a_producer(bus: TokenBus) -> None:
    def produce() -> None:
        time.sleep(0.3)
        bus.publish("late", "done", {"n": 1})

    thread = threading.Thread(target=produce)
    thread.start()
    started = time.monotonic()
    events = read(bus, "late", timeout_s=5)
    thread.join()
    assert [e.type for e in events] == ["done"] and 0.25 < time.monotonic() - started < 3


def test_reading_stops_quietly_at_the_timeout(bus: TokenBus) -> None:
    started = time.monotonic()
    assert read(bus, "nothing", timeout_s=0.3) == []
    assert time.monotonic() - started < 2


def test_streams_and_status_expire(bus: TokenBus) -> None:
    bus.publish("r", "token", {})
    bus.set_status("r", status="queued", tenant_id="t")
    assert 0 < bus.client.ttl(bus.stream_key("r")) <= 30
    assert 0 < bus.client.ttl(bus.status_key("r")) <= 30


def test_stream_length_is_bounded(bus: TokenBus) -> None:
    for i in range(500):
        bus.publish("big", "token", {"seq": i})
    assert bus.client.xlen(bus.stream_key("big")) < 200  # approximate trimming keeps it near maxlen (50)


def test_status_hash_round_trip(bus: TokenBus) -> None:
    assert bus.get_status("missing") == {}
    bus.set_status("r", status="queued", tenant_id="t1")
    bus.set_status("r", status="running")
    status = bus.get_status("r")
    assert status["status"] == "running" and status["tenant_id"] == "t1" and float(status["updated_at"]) > 0


def test_read_all_returns_everything(bus: TokenBus) -> None:
    bus.publish("r", "token", {"seq": 0})
    bus.publish("r", "done", {})
    assert [e.type for e in bus.read_all("r")] == ["token", "done"]


def test_keys_live_under_the_prefix(bus: TokenBus) -> None:
    assert bus.stream_key("x") == f"{bus.prefix}:stream:x" and bus.status_key("x") == f"{bus.prefix}:req:x"


def test_redis_down_is_service_unavailable() -> None:
    down = TokenBus(url=f"redis://127.0.0.1:{free_port()}/0", prefix="x", maxlen=10, ttl_s=10, socket_timeout_s=0.5)
    with pytest.raises(ServiceUnavailable) as info:
        down.publish("r", "token", {})
    assert info.value.data == {"service": "redis"}
    calls = (
        lambda: down.set_status("r", status="x"),
        lambda: down.get_status("r"),
        lambda: down.read_all("r"),
        lambda: read(down, "r", timeout_s=1),
        lambda: down.begin("r", executed_by="w"),
        lambda: down.finish("r", "done", {}, status="completed"),
    )
    for call in calls:
        with pytest.raises(ServiceUnavailable):
            call()


def test_one_async_client_per_event_loop(bus: TokenBus) -> None:
    async def twice() -> tuple[int, int]:
        return id(bus.aclient()), id(bus.aclient())

    a, b = asyncio.run(twice())
    assert a == b


def test_both_clients_parse_replies_with_hiredis(bus: TokenBus) -> None:
    """redis-py's C parser (requirements: hiredis): without it, redis-py falls back to
    its Python parser silently, at about a tenth more CPU per request in a worker."""
    pool = bus.client.connection_pool
    connection = pool.get_connection()
    try:
        assert type(connection._parser).__name__ == "_HiredisParser"
    finally:
        pool.release(connection)

    async def parser() -> str:
        client = bus.aclient()
        await client.ping()
        connection = await client.connection_pool.get_connection()
        try:
            return type(connection._parser).__name__
        finally:
            await client.connection_pool.release(connection)
            await client.aclose()

    assert asyncio.run(parser()) == "_AsyncHiredisParser"


def test_process_bus_uses_settings() -> None:
    bus = get_bus()
    assert bus is get_bus()
    assert bus.prefix == settings.REDIS_KEY_PREFIX and bus.url == settings.REDIS_URL


def test_a_stopped_redis_fails_fast_not_after_redis_pys_retries() -> None:
    bus = TokenBus(url=f"redis://127.0.0.1:{free_port()}/0", prefix="p", maxlen=10, ttl_s=10, socket_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        bus.publish("r", "token", {"seq": 0})
    # redis-py's default retries (ten, with backoff) kept this waiting about 4 s.
    assert time.monotonic() - started < 1.5


def test_pooled_connections_survive_a_redis_restart(tmp_path: Path) -> None:
    from tests.pipeline.test_redis_outage import OwnRedis

    own = OwnRedis(tmp_path)
    own.start()
    try:
        bus = TokenBus(url=f"redis://127.0.0.1:{own.port}/0", prefix="p", maxlen=10, ttl_s=10, socket_timeout_s=0.5)
        bus.publish("r", "token", {"seq": 0})
        own.stop()
        own.start()  # the pooled connection was closed by a server that is gone
        bus.publish("r", "done", {})  # reconnects: no error reaches the caller
        assert [e.type for e in bus.read_all("r")] == ["done"]  # the new server kept nothing

        async def read_after_restart() -> list[str]:
            seen = [e.type async for e in bus.events("r", timeout_s=1)]
            own.stop()
            own.start()
            bus.publish("r2", "done", {})
            return seen + [e.type async for e in bus.events("r2", timeout_s=1)]

        assert asyncio.run(read_after_restart()) == ["done", "done"]
    finally:
        own.stop()


def test_begin_marks_a_queued_request_running_in_one_round_trip(bus: TokenBus) -> None:
    bus.set_status("r", status="queued", created_at="1700000000.5", tenant_id="t")
    assert bus.begin("r", executed_by="host:1") == "1700000000.5"
    status = bus.get_status("r")
    assert status["status"] == "running" and status["executed_by"] == "host:1" and status["tenant_id"] == "t"
    assert 0 < bus.client.ttl(bus.status_key("r")) <= 30


def test_begin_leaves_a_finished_request_alone(bus: TokenBus) -> None:
    for final in ("completed", "failed"):
        bus.set_status(f"r-{final}", status=final)
        assert bus.begin(f"r-{final}", executed_by="host:2") is None
        assert bus.get_status(f"r-{final}")["status"] == final and "executed_by" not in bus.get_status(f"r-{final}")


def test_begin_on_an_unknown_request_runs_it_without_a_creation_time(bus: TokenBus) -> None:
    assert bus.begin("never-queued", executed_by="host:3") == ""
    assert bus.get_status("never-queued")["status"] == "running"


def test_finish_appends_the_terminal_event_and_the_status_together(bus: TokenBus) -> None:
    bus.set_status("r", status="running")
    bus.finish("r", "done", {"text": "hi"}, status="completed")
    assert [(e.type, e.data) for e in bus.read_all("r")] == [("done", {"text": "hi"})]
    assert bus.get_status("r")["status"] == "completed" and 0 < bus.client.ttl(bus.stream_key("r")) <= 30
