"""The token bus: one Redis Stream per request (``<prefix>:stream:<request_id>``)
and one status hash (``<prefix>:req:<request_id>``), both with a TTL.

The producer (a Celery task) appends ``token``, ``done`` and ``error`` events;
every reader reads from any position at its own pace. Redis failures become
``ServiceUnavailable`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator_site.errors import ServiceUnavailable

TERMINAL = frozenset({"done", "error"})


@dataclass(frozen=True)
class BusEvent:
    id: str
    type: str
    data: dict[str, Any]


@contextlib.contextmanager
def redis_errors(action: str) -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"redis unavailable while trying to {action}", data={"service": "redis"}) from exc


def one_retry() -> Retry:
    """One immediate retry, on a new connection: enough for a pooled connection that
    a restarted Redis closed. redis-py's default (ten retries with backoff) keeps a
    call to a stopped Redis waiting about four seconds, whatever the socket timeout."""
    return Retry(NoBackoff(), 1)


def one_async_retry() -> AsyncRetry:
    return AsyncRetry(NoBackoff(), 1)


class TokenBus:
    def __init__(self, *, url: str, prefix: str, maxlen: int, ttl_s: int, socket_timeout_s: float) -> None:
        self.url = url
        self.prefix = prefix
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self._socket_timeout_s = socket_timeout_s
        self._sync: redis.Redis | None = None
        self._lock = threading.Lock()
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()

    def stream_key(self, request_id: str) -> str:
        return f"{self.prefix}:stream:{request_id}"

    def status_key(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    @property
    def client(self) -> redis.Redis:
        if self._sync is None:
            with self._lock:
                if self._sync is None:
                    self._sync = redis.Redis.from_url(
                        self.url,
                        socket_timeout=self._socket_timeout_s,
                        socket_connect_timeout=self._socket_timeout_s,
                        decode_responses=True,
                        retry=one_retry(),
                    )
        return self._sync

    def _aclient(self) -> aioredis.Redis:
        # Async connections belong to the loop that opened them.
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=self._socket_timeout_s + 5.0,
                socket_connect_timeout=self._socket_timeout_s,
                decode_responses=True,
                retry=one_async_retry(),
            )
            self._async[loop] = client
        return client

    # --- producer side (sync: Celery tasks) -----------------------------------------
    def publish(self, request_id: str, event_type: str, data: dict[str, Any]) -> str:
        key = self.stream_key(request_id)
        with redis_errors("publish to the token bus"):
            pipe = self.client.pipeline(transaction=False)
            fields: dict[Any, Any] = {"type": event_type, "data": json.dumps(data)}
            pipe.xadd(key, fields, maxlen=self.maxlen, approximate=True)
            pipe.expire(key, self.ttl_s)
            entry_id, _ = pipe.execute()
        return str(entry_id)

    def set_status(self, request_id: str, **fields: str) -> None:
        key = self.status_key(request_id)
        with redis_errors("record the request status"):
            pipe = self.client.pipeline(transaction=False)
            mapping: dict[Any, Any] = {**fields, "updated_at": f"{time.time():.6f}"}
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def get_status(self, request_id: str) -> dict[str, str]:
        with redis_errors("read the request status"):
            raw: Any = self.client.hgetall(self.status_key(request_id))
        return {str(k): str(v) for k, v in raw.items()}

    def read_all(self, request_id: str) -> list[BusEvent]:
        with redis_errors("read the token bus"):
            entries: Any = self.client.xrange(self.stream_key(request_id))
        return [_event(entry_id, fields) for entry_id, fields in entries]

    # --- consumer side (async: the gateway) ---------------------------------------
    async def events(self, request_id: str, *, after: str = "0-0", timeout_s: float) -> AsyncIterator[BusEvent]:
        """Events after ``after`` until a terminal one; stops quietly at ``timeout_s``."""
        key = self.stream_key(request_id)
        deadline = time.monotonic() + timeout_s
        client = self._aclient()
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return
            with redis_errors("read the token bus"):
                reply: Any = await client.xread({key: after}, count=256, block=min(remaining_ms, 5000))
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    after = entry_id
                    event = _event(entry_id, fields)
                    yield event
                    if event.type in TERMINAL:
                        return


def _event(entry_id: str, fields: dict[str, str]) -> BusEvent:
    return BusEvent(id=entry_id, type=fields.get("type", ""), data=json.loads(fields.get("data") or "{}"))


_bus: TokenBus | None = None
_bus_lock = threading.Lock()


def get_bus() -> TokenBus:
    global _bus
    if _bus is None:
        from pipeline.config import get_config

        cfg = get_config().tokenbus
        with _bus_lock:
            if _bus is None:
                _bus = TokenBus(
                    url=settings.REDIS_URL,
                    prefix=settings.REDIS_KEY_PREFIX,
                    maxlen=cfg.maxlen,
                    ttl_s=cfg.ttl_s,
                    socket_timeout_s=settings.REDIS_SOCKET_TIMEOUT_S,
                )
    return _bus
