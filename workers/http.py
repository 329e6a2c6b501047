"""HTTP plumbing shared by the HTTP workers, and the one place where transport and
protocol failures become ``WorkerError``s.

Streams (the real-time path) go through aiohttp, one session per event loop;
whole requests (``infer``: batch jobs, called from plain threads) through httpx's
sync client, one per thread. aiohttp, because reading a streamed reply through
httpx cost a worker about twice the CPU (BENCHMARKS.md), and a worker's CPU is
what bounds the streamed requests a machine completes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import ssl
import threading
import urllib.request
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx

from orchestrator_site import telemetry
from orchestrator_site.errors import (
    ContextLengthExceeded,
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
from workers.sse import aiter_lines

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


# Each provider's words for a request longer than the model's context window, with the
# window and the tokens it counted: llama.cpp; OpenAI and vLLM; Anthropic.
_CONTEXT_WORDS = (
    re.compile(r"request \((?P<requested>\d+) tokens\) exceeds the available context size \((?P<window>\d+) tokens\)"),
    re.compile(r"maximum context length is (?P<window>\d+) tokens\. However, (?:your messages resulted in|you requested) (?P<requested>\d+) tokens"),
    re.compile(r"prompt is too long: (?P<requested>\d+) tokens > (?P<window>\d+) maximum"),
)


def context_length_error(worker: str, status: int, body: bytes) -> ContextLengthExceeded | None:
    """A provider's refusal of a request longer than the model's window, as the client's
    error (400 ``context_length_exceeded``), or None for any other answer."""
    if status not in (400, 413):
        return None
    message = _provider_message(body)
    found = next((m for m in (words.search(message) for words in _CONTEXT_WORDS) if m is not None), None)
    error = _error_object(body)
    marked = error.get("code") == "context_length_exceeded" or error.get("type") == "exceed_context_size_error"
    if found is None and not marked:
        return None
    window = error.get("n_ctx", found["window"] if found else None)
    requested = error.get("n_prompt_tokens", found["requested"] if found else None)
    data = {
        "worker": worker,
        "context_tokens": int(window) if window is not None else None,
        "requested_tokens": int(requested) if requested is not None else None,
        "upstream_status": status,
        "upstream_message": message,
    }
    return ContextLengthExceeded(f"{worker}: the request is longer than the model's context window", data=data)


def _error_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError:
        return {}
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else {}


def error_for_status(worker: str, status: int, headers: Mapping[str, str], body: bytes) -> OrchestratorError:
    """The error for a provider's 4xx/5xx answer (``headers``: case-insensitive)."""
    too_long = context_length_error(worker, status, body)
    if too_long is not None:
        return too_long
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
    """The choke point: httpx, aiohttp and parsing failures inside become the error tree."""
    try:
        yield
    except OrchestratorError:
        raise
    except (httpx.TimeoutException, TimeoutError) as exc:
        # aiohttp's connect and read timeouts are TimeoutErrors (and ClientErrors).
        raise WorkerTimeout(f"{worker}: timed out ({type(exc).__name__})", data={"worker": worker}) from exc
    except (httpx.TransportError, httpx.StreamError, aiohttp.ClientError) as exc:
        raise WorkerConnectionError(f"{worker}: connection failed ({type(exc).__name__})", data={"worker": worker}) from exc
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        # json.JSONDecodeError is a ValueError; the rest come from bodies of the wrong shape.
        raise WorkerProtocolError(f"{worker}: malformed response ({type(exc).__name__}: {exc})", data={"worker": worker}) from exc


def check_response(worker: str, response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise error_for_status(worker, response.status_code, response.headers, response.read())


def json_object(worker: str, raw: str | bytes) -> dict[str, Any]:
    payload = json.loads(raw)
    if not isinstance(payload, dict):
        raise WorkerProtocolError(f"{worker}: expected a JSON object, got {type(payload).__name__}", data={"worker": worker})
    return payload


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's one TLS client context, as httpx would build it (certifi's CAs, or
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``), for the sync and the async clients alike.
    Built per client otherwise: ~20 ms of loading certificates, paid in a worker
    thread's first request (each thread's event loop has a client of its own) and
    holding up the others."""
    return httpx.create_ssl_context()


def env_proxy(url: str) -> str | None:
    """The proxy ``HTTP_PROXY``/``HTTPS_PROXY`` name for ``url``, None when there is none
    or ``NO_PROXY`` covers its host: as httpx reads them. Read once per worker, for its
    one base URL (aiohttp's ``trust_env`` reads the environment and ``~/.netrc`` again
    on every request: ~4 % of a worker's time under load)."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc):
        return None
    return proxy


# A loop's session, and what closes it with the loop.
_Sessions = weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[aiohttp.ClientSession, AsyncGenerator[None, None]]]


class HttpClients:
    """Per thread, one sync client (httpx) and, per event loop, one async session
    (aiohttp: a session's connections belong to the loop that opened them).

    Threads do not share a sync client: httpcore's pool, shared, can close a
    connection another thread has just been given (it reads the connection as idle,
    then the reply to that thread's request as the server hanging up) and that
    thread's read fails with EBADF; seen in 9 of 15 runs of 12 threads under load.
    The sync requests of all threads together still hold ``max_connections``.

    A loop's session is closed when ``asyncio.run`` (or anything calling
    ``loop.shutdown_asyncgens()``) ends that loop; the workers' own thread loops
    live as long as their threads."""

    def __init__(self, settings: WorkerSettings, headers: dict[str, str]) -> None:
        self._worker = settings.name
        self._timeout = httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s)
        # As httpx's: the wait for a pool slot, each read and the TCP connect bounded; the
        # whole stream not (a long reply is not an error).
        self._async_timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.timeout_s + settings.connect_timeout_s, sock_connect=settings.connect_timeout_s, sock_read=settings.timeout_s
        )
        self._max_connections = settings.max_connections
        self._limits = httpx.Limits(max_connections=settings.max_connections, max_keepalive_connections=settings.max_connections)
        self._headers = {**headers, **settings.extra_headers}
        self._base_url = settings.base_url.rstrip("/")
        self._proxy = env_proxy(self._base_url)
        self._lock = threading.Lock()
        self._mine = threading.local()
        self._sync_clients: list[httpx.Client] = []
        self._sync_slots = threading.BoundedSemaphore(settings.max_connections)
        self._sessions: _Sessions = weakref.WeakKeyDictionary()

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

    async def session(self) -> aiohttp.ClientSession:
        """The running loop's session (its connections kept from one request to the next)."""
        loop = asyncio.get_running_loop()
        held = self._sessions.get(loop)
        if held is not None and not held[0].closed:
            return held[0]
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections, ssl=tls_context()),
            timeout=self._async_timeout,
            headers=self._headers,
        )
        keeper = _close_with_loop(session, self._sessions, loop)
        await anext(keeper)  # now the loop knows it: it is closed when the loop shuts down
        self._sessions[loop] = (session, keeper)
        return session

    @contextlib.asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[str]]:
        """POST ``body`` as JSON and give the reply's lines as they arrive (a 4xx/5xx
        answer raises its error). Inside ``translate_errors``. Traced as the call's
        CLIENT span when tracing is on (with the trace context sent along)."""
        url = self._base_url + path
        headers: dict[str, str] = {}
        with telemetry.http_client_span("POST", url, headers) as span:
            session = await self.session()
            async with session.post(url, json=body, headers=headers, proxy=self._proxy) as response:
                telemetry.http_status(span, response.status)
                if response.status >= 400:
                    raise error_for_status(self._worker, response.status, response.headers, await response.read())
                yield aiter_lines(response.content.iter_any())

    def close(self) -> None:
        with self._lock:
            clients, self._sync_clients = self._sync_clients, []
        for client in clients:
            client.close()


async def _close_with_loop(session: aiohttp.ClientSession, sessions: _Sessions, loop: asyncio.AbstractEventLoop) -> AsyncGenerator[None, None]:
    """Holds a loop's session open until the loop shuts its async generators down
    (``asyncio.run`` does, before closing the loop), then closes it: a session left
    open on a closed loop complains, and leaks its sockets, when collected."""
    try:
        yield
    finally:
        held = sessions.get(loop)
        if held is not None and held[0] is session:
            del sessions[loop]
        await session.close()
