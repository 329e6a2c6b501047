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
from pipeline.shared_redis import SharedRedis
from pipeline.tokenbus import BusEvent, RequestStatus, TokenBus, fencing, get_bus, reader, set_bus
from pipeline.tokenbus.fencing import Run
from pipeline.tokenbus.producer import Producer
from pipeline.tokenbus.reader import read_events
from tests.conftest import begun_run, free_port, scratch_bus


@pytest.fixture
def bus() -> Iterator[TokenBus]:
    with scratch_bus("bustest", maxlen=50) as bus:
        yield bus


def read(bus: TokenBus, request_id: str, timeout_s: float = 2.0) -> list[BusEvent]:
    async def run() -> list[BusEvent]:
        return [e async for e in read_events(bus, request_id, timeout_s=timeout_s)]

    return asyncio.run(run())


def test_events_are_read_in_order_up_to_the_terminal_one(bus: TokenBus) -> None:
    for i in range(3):
        bus.append("r", "token", {"seq": i, "text": f"t{i}"}, attempt=1)
    bus.append("r", "done", {"ok": True}, attempt=1)
    bus.append("r", "token", {"seq": 99}, attempt=1)  # after done: never read
    events = read(bus, "r")
    assert [e.type for e in events] == ["token", "token", "token", "done"]
    assert [e.data.get("seq") for e in events[:3]] == [0, 1, 2] and {e.attempt for e in events} == {1}


def test_a_reader_waits_for_a_producer(bus: TokenBus) -> None:
    def produce() -> None:
        time.sleep(0.3)
        bus.append("late", "done", {"n": 1}, attempt=1)

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
    bus.append("r", "token", {})
    bus.set_record("r", status="queued", tenant_id="t")
    assert 0 < bus.redis.client.ttl(bus.stream_key("r")) <= 30
    assert 0 < bus.redis.client.ttl(bus.record_key("r")) <= 30


def test_stream_length_is_bounded(bus: TokenBus) -> None:
    for i in range(500):
        bus.append("big", "token", {"seq": i})
    assert bus.redis.client.xlen(bus.stream_key("big")) < 200  # approximate trimming keeps it near maxlen (50)


def test_status_hash_round_trip(bus: TokenBus) -> None:
    assert bus.get_record("missing") == {}
    bus.set_record("r", status="queued", tenant_id="t1")
    bus.set_record("r", status="running")
    status = bus.get_record("r")
    assert status["status"] == "running" and status["tenant_id"] == "t1" and float(status["updated_at"]) > 0


def test_read_all_returns_everything(bus: TokenBus) -> None:
    bus.append("r", "token", {"seq": 0})
    bus.append("r", "done", {})
    assert [e.type for e in bus.read_all("r")] == ["token", "done"]


def test_keys_live_under_the_prefix(bus: TokenBus) -> None:
    assert bus.stream_key("x") == f"{bus.prefix}:stream:x" and bus.record_key("x") == f"{bus.prefix}:req:x"


def dead_bus() -> TokenBus:
    return TokenBus(redis=SharedRedis(url=f"redis://127.0.0.1:{free_port()}/0", prefix="x", socket_timeout_s=0.5), maxlen=10, ttl_s=10)


def test_redis_down_is_service_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    down = dead_bus()
    with pytest.raises(ServiceUnavailable) as info:
        down.append("r", "token", {})
    assert info.value.data == {"service": "redis"}
    monkeypatch.setattr(reader, "OUTAGE_S", 0.2)
    producer = Producer(down, Run.new("r", 1))
    calls = (
        lambda: down.set_record("r", status="x"),
        lambda: down.get_record("r"),
        lambda: down.read_all("r"),
        lambda: read(down, "r", timeout_s=1),
        lambda: fencing.begin(down, producer.run, lease_s=1, executed_by="w"),
        lambda: fencing.renew(down, [producer.run], lease_s=1),
        lambda: fencing.lapsed(down, now=0),
        lambda: fencing.lapse(down, "r", next_lease_s=1, max_runs=1),
        lambda: fencing.fail(down, "r", ServiceUnavailable()),
        lambda: fencing.lease_published(down, "r", lease_s=1),
        lambda: producer.publish_token(0, "t"),
        lambda: producer.finish("done", {}, status=RequestStatus.COMPLETED),
        lambda: producer.wanted(),
    )
    for call in calls:
        with pytest.raises(ServiceUnavailable):
            call()


def test_one_async_client_per_event_loop(bus: TokenBus) -> None:
    async def twice() -> tuple[int, int]:
        return id(bus.redis.aclient()), id(bus.redis.aclient())

    a, b = asyncio.run(twice())
    assert a == b


def test_both_clients_parse_replies_with_hiredis(bus: TokenBus) -> None:
    """redis-py's C parser (requirements: hiredis): without it, redis-py falls back to
    its Python parser silently, at about a tenth more CPU per request in a worker."""
    pool = bus.redis.client.connection_pool
    connection = pool.get_connection()
    try:
        assert type(connection._parser).__name__ == "_HiredisParser"
    finally:
        pool.release(connection)

    async def parser() -> str:
        client = bus.redis.aclient()
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
    assert bus.prefix == settings.REDIS_KEY_PREFIX and bus.redis.url == settings.REDIS_URL


def test_a_stopped_redis_fails_fast_not_after_redis_pys_retries() -> None:
    bus = dead_bus()
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        bus.append("r", "token", {"seq": 0})
    # redis-py's default retries (ten, with backoff) kept this waiting about 4 s.
    assert time.monotonic() - started < 1.5


def test_pooled_connections_survive_a_redis_restart(tmp_path: Path) -> None:
    from tests.pipeline.test_redis_outage import OwnRedis

    own = OwnRedis(tmp_path)
    own.start()
    try:
        bus = TokenBus(redis=SharedRedis(url=f"redis://127.0.0.1:{own.port}/0", prefix="p", socket_timeout_s=0.5), maxlen=10, ttl_s=10)
        bus.append("r", "token", {"seq": 0}, attempt=1)
        own.stop()
        own.start()  # the pooled connection was closed by a server that is gone
        bus.append("r", "done", {}, attempt=1)  # reconnects: no error reaches the caller
        assert [e.type for e in bus.read_all("r")] == ["done"]  # the new server kept nothing

        async def read_after_restart() -> list[str]:
            seen = [e.type async for e in read_events(bus, "r", timeout_s=1)]
            own.stop()
            own.start()
            bus.append("r2", "done", {}, attempt=1)
            return seen + [e.type async for e in read_events(bus, "r2", timeout_s=1)]

        assert asyncio.run(read_after_restart()) == ["done", "done"]
    finally:
        own.stop()


def test_the_record_is_the_requests_and_expires_with_it(bus: TokenBus) -> None:
    producer = begun_run(bus, "r")
    producer.finish("done", {"text": "hi"}, status=RequestStatus.COMPLETED)
    assert [(e.type, e.data, e.attempt) for e in bus.read_all("r")] == [("done", {"text": "hi"}, 1)]
    assert bus.get_record("r")["status"] == "completed" and 0 < bus.redis.client.ttl(bus.stream_key("r")) <= 30
    assert 0 < bus.redis.client.ttl(bus.record_key("r")) <= 30


def test_the_status_enum_knows_which_are_final() -> None:
    assert [s.value for s in RequestStatus if s.finished] == ["completed", "failed"]


def test_a_set_bus_replaces_the_process_bus(bus: TokenBus) -> None:
    set_bus(bus)
    try:
        assert get_bus() is bus
    finally:
        set_bus(None)
    assert get_bus() is not bus and get_bus().prefix == settings.REDIS_KEY_PREFIX
