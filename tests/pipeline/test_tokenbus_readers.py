"""Several readers of one request stream, each at its own pace, all see every event."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.tokenbus import BusEvent, RequestStatus, TokenBus
from pipeline.tokenbus.reader import read_events
from tests.conftest import begun_run, scratch_bus


@pytest.fixture
def bus() -> Iterator[TokenBus]:
    with scratch_bus("readers", maxlen=10_000) as bus:
        yield bus


def produce(bus: TokenBus, n: int, delay_s: float) -> None:
    producer = begun_run(bus, "r")
    for i in range(n):
        producer.publish_token(i, f"t{i}")
        time.sleep(delay_s)
    producer.finish("done", {}, status=RequestStatus.COMPLETED)


def test_slow_and_fast_readers_each_get_the_whole_sequence(bus: TokenBus) -> None:
    producer = threading.Thread(target=produce, args=(bus, 200, 0.001))

    async def reader(pause_s: float) -> list[BusEvent]:
        seen = []
        async for event in read_events(bus, "r", timeout_s=20):
            seen.append(event)
            if pause_s:
                await asyncio.sleep(pause_s)
        return seen

    async def both() -> tuple[list[BusEvent], list[BusEvent], float, float]:
        started = time.monotonic()

        async def timed(pause: float) -> tuple[list[BusEvent], float]:
            events = await reader(pause)
            return events, time.monotonic() - started

        (fast, fast_t), (slow, slow_t) = await asyncio.gather(timed(0), timed(0.01))
        return fast, slow, fast_t, slow_t

    producer.start()
    fast, slow, fast_t, slow_t = asyncio.run(both())
    producer.join()
    for events in (fast, slow):
        assert [e.data.get("seq") for e in events[:-1]] == list(range(200)) and events[-1].type == "done"
    assert fast_t < slow_t  # the fast reader finished first: the slow one never held it back


def test_a_late_reader_replays_from_the_start(bus: TokenBus) -> None:
    produce(bus, 5, 0)

    async def late() -> list[BusEvent]:
        return [e async for e in read_events(bus, "r", timeout_s=2)]

    assert [e.type for e in asyncio.run(late())] == ["token"] * 5 + ["done"]
