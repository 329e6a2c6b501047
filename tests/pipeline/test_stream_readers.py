"""Who still reads a request's stream: readers sign in while they read and out when
they stop, and the producer learns in its publishing round trip (or by asking,
while the upstream is silent) when the last one has gone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from asgiref.sync import async_to_sync

from orchestrator_site.errors import RequestCancelled
from pipeline.config import PipelineSettings, PostprocessConfig
from pipeline.engine import PipelineDeps, run_pipeline
from pipeline.stages import streamed
from pipeline.stages.rag import RetrievalResult
from pipeline.tokenbus import RequestStatus, TokenBus, reader
from pipeline.tokenbus.producer import Producer
from pipeline.tokenbus.reader import KEEP, READER_LEASE_S, read_events
from pipeline.types import AssembledPrompt, Completion, PromptRequest, TokenChunk, Usage
from tests.conftest import begun_run, scratch_bus


@pytest.fixture
def bus() -> Iterator[TokenBus]:
    with scratch_bus("subs", maxlen=1000) as bus:
        yield bus


_producers: dict[tuple[str, str], Producer] = {}


def producer_of(bus: TokenBus, rid: str) -> Producer:
    """The producer of a run that has begun the request ``rid`` (begun on first use)."""
    key = (bus.prefix, rid)
    if key not in _producers:
        _producers[key] = begun_run(bus, rid)
    return _producers[key]


def token(bus: TokenBus, seq: int, rid: str = "r") -> bool:
    return producer_of(bus, rid).publish_token(seq, f"t{seq}")


def wanted(bus: TokenBus, rid: str = "r") -> bool:
    return producer_of(bus, rid).wanted()


async def read_first(bus: TokenBus, rid: str = "r", *, timeout_s: float = 5) -> AsyncIterator[None]:
    """A reader that has read one event and holds on (its lease stays signed in)."""
    events = read_events(bus, rid, timeout_s=timeout_s)
    await anext(events)
    try:
        yield None
    finally:
        await events.aclose()


def test_a_stream_nobody_ever_read_is_wanted_to_the_end(bus: TokenBus) -> None:
    # "wait": false: the client polls for the result later; nobody reads the stream.
    assert all(token(bus, i) for i in range(3)) and wanted(bus)
    assert bus.redis.client.zcard(bus.readers_key("r")) == 0


def test_the_last_reader_leaving_makes_the_stream_unwanted(bus: TokenBus) -> None:
    token(bus, 0)

    async def scenario() -> tuple[bool, bool, bool]:
        first = read_first(bus)
        second = read_first(bus)
        await anext(first)
        await anext(second)
        both = token(bus, 1)
        await first.aclose()
        one_left = token(bus, 2)
        await second.aclose()
        return both, one_left, token(bus, 3)

    both, one_left, none_left = async_to_sync(scenario)()
    assert both and one_left and not none_left and not wanted(bus)
    assert [score for _, score in bus.redis.client.zrange(bus.readers_key("r"), 0, -1, withscores=True)] == [float("-inf")] * 2  # signed out
    assert 0 < bus.redis.client.ttl(bus.readers_key("r")) <= 30  # the reader set expires with the stream


def test_a_reader_cancelled_while_it_waits_signs_out(bus: TokenBus) -> None:
    async def scenario() -> tuple[bool, bool]:
        async def reader() -> None:
            async for _ in read_events(bus, "r", timeout_s=10):
                pass

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0.3)  # blocked in XREAD: nothing published yet
        wanted_while_reading = wanted(bus)
        task.cancel()  # what the consumer does when its client leaves
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return wanted_while_reading, wanted(bus)

    assert async_to_sync(scenario)() == (True, False)


@pytest.mark.parametrize("closed_at_the_end", [False, True])
def test_a_reader_that_reaches_the_end_does_not_sign_out(bus: TokenBus, closed_at_the_end: bool) -> None:
    """The request is over, so there is nothing left to stop: no round trip is spent
    on signing out (a client that leaves as the last event arrives neither). The lease
    is left to run out with the key."""
    token(bus, 0)
    producer_of(bus, "r").finish("done", {}, status=RequestStatus.COMPLETED)

    async def scenario() -> list[str]:
        seen = []
        async with contextlib.aclosing(read_events(bus, "r", timeout_s=5)) as events:
            async for event in events:
                seen.append(event.type)
                if closed_at_the_end and event.type == "done":
                    break
        return seen

    assert async_to_sync(scenario)() == ["token", "done"]
    leases = [score for _, score in bus.redis.client.zrange(bus.readers_key("r"), 0, -1, withscores=True)]
    assert len(leases) == 1 and time.time() < -leases[0] <= time.time() + READER_LEASE_S  # the lease, not a sign-out (-inf)
    assert 0 < bus.redis.client.ttl(bus.readers_key("r")) <= bus.ttl_s


def test_a_reader_that_times_out_keeps_the_request(bus: TokenBus) -> None:
    # Its client was told to poll for the result: the request must finish.
    async def scenario() -> list[str]:
        return [event.type async for event in read_events(bus, "r", timeout_s=0.2)]

    assert async_to_sync(scenario)() == []
    assert bus.redis.client.zscore(bus.readers_key("r"), KEEP) == float("inf")
    assert token(bus, 0) and wanted(bus)


def test_a_vanished_reader_stops_counting_when_its_lease_runs_out(bus: TokenBus) -> None:
    # A killed gateway never signs out: its lease (renewed at every read) runs out.
    readers = bus.readers_key("r")
    bus.redis.client.zadd(readers, {"gone": -(time.time() - 1), "alive": -(time.time() + READER_LEASE_S)})
    assert wanted(bus)
    bus.redis.client.zadd(readers, {"alive": float("-inf")})
    assert not wanted(bus)


def test_a_late_renewal_never_brings_a_reader_back(bus: TokenBus) -> None:
    """A read cancelled mid-flight may reach Redis after the reader signed out (on
    another connection): its renewal must not count (seen: 5 % of a thousand
    departures kept their request running to the end)."""
    token(bus, 0)

    async def scenario() -> None:
        async with contextlib.aclosing(read_events(bus, "r", timeout_s=5)) as events:
            await anext(events)

    async_to_sync(scenario)()
    ((me, _),) = bus.redis.client.zrange(bus.readers_key("r"), 0, -1, withscores=True)
    bus.redis.client.zadd(bus.readers_key("r"), {me: -(time.time() + READER_LEASE_S)}, lt=True)  # the late renewal, as the reader sends it
    assert not wanted(bus) and not token(bus, 1)


def test_a_reader_renews_its_lease_while_it_reads(bus: TokenBus) -> None:
    async def scenario() -> float:
        async with contextlib.aclosing(read_events(bus, "r", timeout_s=5)) as events:
            token(bus, 0)
            await anext(events)
            ((_member, score),) = bus.redis.client.zrange(bus.readers_key("r"), 0, -1, withscores=True)
            return -score - time.time()

    assert READER_LEASE_S - 2 < async_to_sync(scenario)() <= READER_LEASE_S


# --- the producer's side: the streamed stage stops an unwanted request ---------------------

REQUEST = PromptRequest(request_id="r-c", tenant_id="t", session_id="s", prompt="go", worker="w", model="m", max_tokens=50)
PLAIN = PipelineSettings(postprocess=PostprocessConfig(trim=False, redact_emails=False, redact_api_keys=False))


class Slow:
    """Streams a piece every ``gap_s``, and records when its stream was closed."""

    name = "w"
    supports_streaming = True

    def __init__(self, pieces: int, gap_s: float) -> None:
        self.pieces, self.gap_s = pieces, gap_s
        self.sent = 0
        self.closed_at: float | None = None

    def infer(self, prompt: AssembledPrompt) -> Completion:
        return Completion(text="x", model="m", worker=self.name, usage=Usage(1, 1))

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        try:
            for i in range(self.pieces):
                await asyncio.sleep(self.gap_s)
                self.sent += 1
                yield TokenChunk(index=i, text=f"p{i} ")
        finally:
            self.closed_at = time.monotonic()


def run(worker: Slow, *, publish: object, still_wanted: object = None) -> object:
    deps = PipelineDeps(
        config=PLAIN,
        retrieve=lambda **_: RetrievalResult(()),
        load_history=lambda: (),
        worker=worker,  # type: ignore[arg-type]
        publish=publish,  # type: ignore[arg-type]
        streaming=True,
        still_wanted=still_wanted,  # type: ignore[arg-type]
    )
    return run_pipeline(REQUEST, deps)


def test_a_silent_upstream_is_stopped_when_nobody_wants_it() -> None:
    worker = Slow(pieces=3, gap_s=10.0)  # the provider thinks for a long time
    asked: list[float] = []
    started = time.monotonic()

    def still_wanted() -> bool:
        asked.append(time.monotonic())
        return len(asked) < 2  # the last reader leaves after the first question

    with pytest.raises(RequestCancelled) as caught:
        run(worker, publish=lambda chunk: None, still_wanted=still_wanted)
    assert worker.closed_at is not None and worker.closed_at - started < 1.0
    assert caught.value.data == {"after_tokens": 0}
    assert asked[0] - started >= streamed.WATCH_S * 0.9  # asked only after a silence


def test_a_busy_upstream_is_not_asked_about() -> None:
    worker = Slow(pieces=20, gap_s=0.02)  # a chunk well within every watch period
    asked: list[int] = []
    published: list[str] = []

    def still_wanted() -> bool:
        asked.append(1)
        return True

    _ctx, result = run(worker, publish=lambda chunk: published.append(chunk.text), still_wanted=still_wanted)  # type: ignore[misc]
    assert "".join(published) == result.text and worker.sent == 20  # type: ignore[attr-defined]
    assert asked == []  # the publishes answered the question: no extra round trips


def nobody_reads_after(index: int) -> Callable[[TokenChunk], None]:
    """A publish that finds every reader gone at the chunk ``index``."""

    def publish(chunk: TokenChunk) -> None:
        if chunk.index == index:
            raise RequestCancelled(data={"after_tokens": index})

    return publish


def test_a_publish_that_finds_nobody_stops_the_upstream_at_once() -> None:
    worker = Slow(pieces=50, gap_s=0.01)
    with pytest.raises(RequestCancelled):
        run(worker, publish=nobody_reads_after(2), still_wanted=lambda: True)
    assert worker.sent == 3 and worker.closed_at is not None


def test_the_watch_never_interrupts_the_closing_of_the_stream() -> None:
    """httpx's close of a response awaits (its pool's lock, the socket's close). A
    publish that finds nobody starts that close; the watch, finding the upstream silent
    meanwhile and nobody wanting it, must not cancel the close half-way: the connection
    would stay open and busy in the pool, and the provider would write the whole reply
    to it (seen: one stream in ~3,000 cut under load)."""

    class SlowToClose(Slow):
        closed_fully = False

        async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
            try:
                for i in range(self.pieces):
                    await asyncio.sleep(self.gap_s)
                    yield TokenChunk(index=i, text=f"p{i} ")
            finally:
                await asyncio.sleep(3 * streamed.WATCH_S)  # the close: longer than a watch period
                self.closed_fully = True

    worker = SlowToClose(pieces=50, gap_s=0.01)
    with pytest.raises(RequestCancelled):
        run(worker, publish=nobody_reads_after(1), still_wanted=lambda: False)
    assert worker.closed_fully


def test_a_worker_error_is_not_taken_for_a_cancellation() -> None:
    class Failing(Slow):
        async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
            yield TokenChunk(index=0, text="a ")
            raise asyncio.CancelledError  # cancelled from elsewhere, not by the watcher

    with pytest.raises(asyncio.CancelledError):
        run(Failing(pieces=1, gap_s=0), publish=lambda chunk: None, still_wanted=lambda: True)


def test_a_cancellation_swallowed_underneath_still_stops_the_reader(bus: TokenBus) -> None:
    """redis-py's async client was seen to swallow about one cancel in twelve of a
    blocked read (the task stays "cancelling" and reads on): the reader honours
    the pending request after its next read, and signs out."""
    token(bus, 0)
    token(bus, 1)

    async def scenario() -> int:
        read = 0

        async def reader() -> None:
            nonlocal read
            me = asyncio.current_task()
            assert me is not None
            me.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)  # swallowed, as it was underneath
            async for _ in read_events(bus, "r", timeout_s=5):
                read += 1

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.ensure_future(reader())
        return read

    assert async_to_sync(scenario)() == 0
    assert [score for _, score in bus.redis.client.zrange(bus.readers_key("r"), 0, -1, withscores=True)] == [float("-inf")]


def test_a_sign_out_cancelled_half_way_still_completes(bus: TokenBus) -> None:
    """The connection's task may be cancelled again while a reader signs out (seen
    under uvicorn: about one departure in a thousand kept its request running)."""
    readers = bus.readers_key("r")

    async def scenario() -> float | None:
        client = bus.redis.aclient()
        await client.zadd(readers, {"me": -(time.time() + READER_LEASE_S)})
        task = asyncio.ensure_future(reader._sign_out(bus, readers, "me"))
        await asyncio.sleep(0)  # under way
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        score: float | None = await client.zscore(readers, "me")
        return score

    assert async_to_sync(scenario)() == float("-inf")
    assert not wanted(bus)
