"""The shared Redis clients' pools: past their size a caller waits for a connection
instead of failing, so that a burst of requests is never taken for Redis being down."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
import redis
from django.conf import settings

from pipeline.shared_redis import SharedRedis, get_redis


def shared(size: int, timeout_s: float = 2.0) -> SharedRedis:
    return SharedRedis(url=settings.REDIS_URL, prefix=f"pool{uuid.uuid4().hex[:6]}", socket_timeout_s=timeout_s, max_connections=size)


def test_an_async_caller_past_the_pool_waits_for_a_connection() -> None:
    async def burst() -> list[object]:
        client = shared(2).aclient()
        # Three blocking reads of 0.3 s on two connections: the third waits its turn.
        return await asyncio.gather(*(client.blpop([f"nothing-{n}"], timeout=0.3) for n in range(3)))

    started = time.monotonic()
    assert asyncio.run(burst()) == [None, None, None]
    assert time.monotonic() - started >= 0.6  # two rounds: the third call waited, it did not fail


def test_a_sync_caller_past_the_pool_waits_too() -> None:
    client = shared(1).client
    results: list[object] = []
    threads = [threading.Thread(target=lambda n=n: results.append(client.blpop([f"nothing-{n}"], timeout=0.3))) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [None, None]


def test_a_connection_that_never_frees_is_an_error_after_the_timeout() -> None:
    async def starved() -> None:
        client = shared(1, timeout_s=0.2).aclient()
        await asyncio.gather(client.blpop(["held"], timeout=1), client.ping())

    with pytest.raises(redis.ConnectionError, match="No connection available"):
        asyncio.run(starved())


def test_the_process_client_takes_its_size_from_the_settings() -> None:
    assert get_redis().max_connections == settings.REDIS_MAX_CONNECTIONS == 1000
