"""httpx plumbing shared by the HTTP workers, and the one place where httpx and
protocol failures become ``WorkerError``s."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import ssl
import threading
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from orchestrator_site.errors import (
    OrchestratorError,
    PermanentWorkerError,
    TransientWorkerError,
    WorkerAuthError,
    WorkerConnectionError,
    WorkerProtocolError,
    WorkerRateLimited,
    WorkerTimeout,
)
from workers.base import WorkerSettings

# 408/409 and 5xx are worth retrying; 529 is Anthropic's "overloaded".
_TRANSIENT_STATUSES = {408, 409, 500, 502, 503, 504, 520, 522, 524, 529}


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.replace(".", "", 1).isdigit():
        return max(0.0, float(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _provider_message(body: bytes) -> str:
    """The provider's own error message, when the body is the usual JSON error shape."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(payload.get("message"), str):
            return str(payload["message"])
    return str(payload)[:200]


def error_for_status(worker: str, status: int, headers: httpx.Headers, body: bytes) -> OrchestratorError:
    data: dict[str, Any] = {"worker": worker, "upstream_status": status, "upstream_message": _provider_message(body)}
    retry_after = parse_retry_after(headers.get("retry-after"))
    if status == 429:
        return WorkerRateLimited(f"{worker}: provider rate limit", data=data, retry_after=retry_after)
    if status in (401, 403):
        return WorkerAuthError(f"{worker}: provider rejected the credentials", data=data)
    if status == 504:
        return WorkerTimeout(f"{worker}: upstream gateway timeout", data=data, retry_after=retry_after)
    if status in _TRANSIENT_STATUSES:
        return TransientWorkerError(f"{worker}: upstream answered {status}", data=data, retry_after=retry_after)
    return PermanentWorkerError(f"{worker}: upstream answered {status}", data=data)


@contextlib.contextmanager
def translate_errors(worker: str) -> Iterator[None]:
    """The choke point: httpx and parsing failures inside become the error tree."""
    try:
        yield
    except OrchestratorError:
        raise
    except httpx.TimeoutException as exc:
        raise WorkerTimeout(f"{worker}: timed out ({type(exc).__name__})", data={"worker": worker}) from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise WorkerConnectionError(f"{worker}: connection failed ({type(exc).__name__})", data={"worker": worker}) from exc
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        # json.JSONDecodeError is a ValueError; the rest come from bodies of the wrong shape.
        raise WorkerProtocolError(f"{worker}: malformed response ({type(exc).__name__}: {exc})", data={"worker": worker}) from exc


def check_response(worker: str, response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise error_for_status(worker, response.status_code, response.headers, response.read())


async def acheck_response(worker: str, response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise error_for_status(worker, response.status_code, response.headers, await response.aread())


def json_object(worker: str, raw: str | bytes) -> dict[str, Any]:
    payload = json.loads(raw)
    if not isinstance(payload, dict):
        raise WorkerProtocolError(f"{worker}: expected a JSON object, got {type(payload).__name__}", data={"worker": worker})
    return payload


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's one TLS client context, as httpx would build it (certifi's CAs, or
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``). httpx builds one per client otherwise: ~20 ms
    of loading certificates, paid in a worker thread's first request (each thread's
    event loop has a client of its own) and holding up the others."""
    return httpx.create_ssl_context()


class HttpClients:
    """Per thread, one sync client and, per event loop, one async client (an
    httpx.AsyncClient's connections belong to the loop that opened them).

    Threads do not share a sync client: httpcore's pool, shared, can close a
    connection another thread has just been given (it reads the connection as idle,
    then the reply to that thread's request as the server hanging up) and that
    thread's read fails with EBADF; seen in 9 of 15 runs of 12 threads under load.
    The sync requests of all threads together still hold ``max_connections``."""

    def __init__(self, settings: WorkerSettings, headers: dict[str, str]) -> None:
        self._timeout = httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s)
        self._limits = httpx.Limits(max_connections=settings.max_connections, max_keepalive_connections=settings.max_connections)
        self._headers = {**headers, **settings.extra_headers}
        self._base_url = settings.base_url.rstrip("/")
        self._lock = threading.Lock()
        self._mine = threading.local()
        self._sync_clients: list[httpx.Client] = []
        self._sync_slots = threading.BoundedSemaphore(settings.max_connections)
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()

    @property
    def sync(self) -> httpx.Client:
        """This thread's sync client (a new one after ``close``, which closed the old)."""
        mine: httpx.Client | None = getattr(self._mine, "client", None)
        if mine is not None and not mine.is_closed:
            return mine
        client = self._mine.client = httpx.Client(
            base_url=self._base_url, timeout=self._timeout, limits=self._limits, headers=self._headers, verify=tls_context()
        )
        with self._lock:
            self._sync_clients.append(client)
        return client

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        """A whole (not streamed) request on this thread's client: at most
        ``max_connections`` at once over all threads of the process."""
        with self._sync_slots:
            return self.sync.post(path, **kwargs)

    @property
    def async_(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            client = httpx.AsyncClient(base_url=self._base_url, timeout=self._timeout, limits=self._limits, headers=self._headers, verify=tls_context())
            self._async[loop] = client
        return client

    def close(self) -> None:
        with self._lock:
            clients, self._sync_clients = self._sync_clients, []
        for client in clients:
            client.close()
