"""The Redis server that holds the platform's fast shared state, and the one place
where its failures become ``ServiceUnavailable``.

Every store (token streams, request records, dedup entries, rate logs, admission
leases, breakers) keeps its keys under one prefix on this server, so that several
deployments, or the test suite, can share it. Sync clients serve Celery tasks and
executor threads; async clients belong to the event loop that opened them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Iterator

import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator_site.errors import ServiceUnavailable


@contextlib.contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """Any Redis failure inside, as ``ServiceUnavailable`` naming ``action``."""
    try:
        yield
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"redis unavailable while trying to {action}", data={"service": "redis"}) from exc


def one_retry() -> Retry:
    """One immediate retry, on a new connection: enough for a pooled connection that
    a restarted Redis closed. redis-py's default (ten retries with backoff) keeps a
    call to a stopped Redis waiting seconds, whatever the socket timeout. Every
    command sent through these clients must therefore be safe to run twice (the
    request start is: ``services.start``)."""
    return Retry(NoBackoff(), 1)


def one_async_retry() -> AsyncRetry:
    return AsyncRetry(NoBackoff(), 1)


class SharedRedis:
    """Clients of the shared-state server at ``url``, its keys under ``prefix``."""

    def __init__(self, *, url: str, prefix: str, socket_timeout_s: float, max_connections: int = 1000) -> None:
        self.url = url
        self.prefix = prefix
        self.socket_timeout_s = socket_timeout_s
        # Per client (this process's sync one, each event loop's async one). A caller that
        # finds every connection busy waits for one (up to the socket timeout) instead of
        # failing: a burst of requests is not Redis being down. redis-py's default pool
        # raises at once past 100 connections, which a gateway reached under 500
        # concurrent requests and then served them as if Redis were down.
        self.max_connections = max_connections
        self._sync: redis.Redis | None = None
        self._lock = threading.Lock()
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def client(self) -> redis.Redis:
        if self._sync is None:
            with self._lock:
                if self._sync is None:
                    pool = redis.BlockingConnectionPool.from_url(
                        self.url,
                        max_connections=self.max_connections,
                        timeout=self.socket_timeout_s,
                        socket_timeout=self.socket_timeout_s,
                        socket_connect_timeout=self.socket_timeout_s,
                        decode_responses=True,
                        retry=one_retry(),
                    )
                    self._sync = redis.Redis(connection_pool=pool)
        return self._sync

    def aclient(self) -> aioredis.Redis:
        """This event loop's client: async connections belong to the loop that opened them.
        Its socket timeout leaves room for a blocking read of up to 5 s (the readers')."""
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=self.socket_timeout_s,
                socket_timeout=self.socket_timeout_s + 5.0,
                socket_connect_timeout=self.socket_timeout_s,
                decode_responses=True,
                retry=one_async_retry(),
            )
            client = aioredis.Redis(connection_pool=pool)
            self._async[loop] = client
        return client


_shared: SharedRedis | None = None
_shared_lock = threading.Lock()


def get_redis() -> SharedRedis:
    """This process's shared-state server, from ``REDIS_URL`` and ``REDIS_KEY_PREFIX``."""
    global _shared
    if _shared is None:
        with _shared_lock:
            if _shared is None:
                _shared = SharedRedis(
                    url=settings.REDIS_URL,
                    prefix=settings.REDIS_KEY_PREFIX,
                    socket_timeout_s=settings.REDIS_SOCKET_TIMEOUT_S,
                    max_connections=settings.REDIS_MAX_CONNECTIONS,
                )
    return _shared


def set_redis(shared: SharedRedis | None) -> None:
    """Replace (or with None, forget) this process's server: tests point it at a dead port."""
    global _shared
    with _shared_lock:
        _shared = shared
