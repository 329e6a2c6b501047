"""Reading a request's token stream, from any position, at the reader's own pace.

Readers sign in (``<prefix>:subs:<request_id>``, a sorted set of leases) so that
the run producing the stream can tell when nobody reads any more: a request
whose every reader has left is not wanted, and its upstream call is stopped
(``tokenbus.producer``). A request nobody ever read (``"wait": false``, polled
later) and one a reader gave up on at its timeout (the client was told to poll)
run to the end.

Events carry the attempt that wrote them. Fencing lets only one run write, but a
reader does not rely on it alone: it drops an event of an attempt older than one
it has seen, and a token whose sequence number it has already passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Callable

import redis

from orchestrator_site.errors import ServiceUnavailable
from pipeline.shared_redis import redis_errors
from pipeline.tokenbus.bus import TERMINAL_EVENTS, BusEvent, TokenBus, event_from_entry

# A reader's lease is stored as the negated time it runs out: a reader renews with
# ZADD LT (only ever later), and signs out by setting -inf, which no renewal can
# undo however late it reaches Redis (a read cancelled mid-flight can land after the
# sign-out, on another connection). A reader that vanished without signing out (a
# killed gateway) stops counting after READER_LEASE_S; it renews on every read,
# at least every BLOCK_MS.
READER_LEASE_S = 15.0
BLOCK_MS = 5000
KEEP = "!"  # someone was told to poll for the result: finish it whatever happens (score +inf)
# How long a reader retries a failing Redis before it gives up (a run may still be
# writing: a blip costs the client nothing).
OUTAGE_S = 5.0


class AttemptFilter:
    """Which events a reader passes on: none from an attempt older than the newest
    seen, and no token it has already passed (by sequence number, per attempt)."""

    def __init__(self) -> None:
        self.attempt = 0
        self.last_seq = -1

    def accepts(self, event: BusEvent) -> bool:
        if event.attempt < self.attempt:
            return False
        if event.attempt > self.attempt:
            self.attempt, self.last_seq = event.attempt, -1
        if event.type != "token":
            return True
        seq = int(event.data.get("seq", 0))
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        return True


async def read_events(
    bus: TokenBus, request_id: str, *, timeout_s: float, on_outage: Callable[[BaseException], None] | None = None
) -> AsyncGenerator[BusEvent, None]:
    """The stream's events until a terminal one; stops quietly at ``timeout_s``.

    The reader holds a lease on the stream while it reads, and gives it back when it
    stops before the end (close the generator: ``contextlib.aclosing``); after the
    terminal event nothing is left to stop, and the lease runs out with the key. At
    ``timeout_s`` the request is kept: its client was told to poll for the result.
    A Redis failure is told to ``on_outage`` and retried for ``OUTAGE_S``, then raised
    as ``ServiceUnavailable``; so is a Redis that comes back without the request's
    record (it lost its data)."""
    key, readers, record = bus.stream_key(request_id), bus.readers_key(request_id), bus.record_key(request_id)
    reader_id = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    client = bus.redis.aclient()
    position, kept, ended = "0-0", False, False
    passed = AttemptFilter()
    failing_since: float | None = None
    try:
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                kept = True
                await _keep(bus, readers)
                return
            try:
                with redis_errors("read the token bus"):
                    # The lease and the read in one round trip; after an outage, whether
                    # Redis still knows the request (a restarted one may have lost it).
                    pipe = client.pipeline(transaction=False)
                    if failing_since is not None:
                        pipe.exists(record)
                    pipe.zadd(readers, {reader_id: -(time.time() + READER_LEASE_S)}, lt=True)
                    pipe.expire(readers, bus.ttl_s)
                    # Right after an outage the read does not block: the record's fate comes first.
                    pipe.xread({key: position}, count=256, block=None if failing_since is not None else min(remaining_ms, BLOCK_MS))
                    *before, reply = await pipe.execute()
            except ServiceUnavailable as exc:
                if failing_since is None and on_outage is not None:
                    on_outage(exc.__cause__ or exc)  # said at once: others stop waiting on Redis meanwhile
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since >= OUTAGE_S:
                    raise
                await asyncio.sleep(0.1)
                continue
            if failing_since is not None and not before[0] and not reply:
                # Nobody can answer a request Redis forgot: its run cannot write, no sweep can decide it.
                raise ServiceUnavailable("the request was lost with Redis's data; send it again", data={"service": "redis"}, retry_after=1.0)
            failing_since = None
            _raise_if_cancelled()
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    position = entry_id
                    event = event_from_entry(entry_id, fields)
                    if not passed.accepts(event):
                        continue
                    if event.type in TERMINAL_EVENTS:
                        ended = True  # before the yield: a reader closed after the end has nothing to stop
                    yield event
                    if ended:
                        return
    finally:
        if not (kept or ended):
            await _sign_out(bus, readers, reader_id)


async def _keep(bus: TokenBus, readers: str) -> None:
    with redis_errors("keep the request"):
        await bus.redis.aclient().zadd(readers, {KEEP: float("inf")})


async def _sign_out(bus: TokenBus, readers: str, reader_id: str) -> None:
    # Also on a cancelled read (the client left); Redis being away is no news here.
    # Shielded: a second cancellation (the connection's task ending) must not stop the
    # sign-out half-way; the reader would otherwise count for its whole lease.
    signing = asyncio.ensure_future(bus.redis.aclient().zadd(readers, {reader_id: float("-inf")}))
    with contextlib.suppress(redis.RedisError):
        await asyncio.shield(signing)


def _raise_if_cancelled() -> None:
    """redis-py's async client sometimes swallows a cancellation that lands during a
    call (a cancel of a blocked XREAD, seen with redis-py 8.1 on Python 3.11: the task
    stays "cancelling" and reads on), which would keep a departed client's stream
    read to the end. The request is still on the task: honour it here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
