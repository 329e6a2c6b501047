"""The one place where httpx and protocol failures become worker errors."""

from __future__ import annotations

import asyncio
import ssl
import threading
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
import pytest

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
from pipeline.config import WorkerConfig
from workers.base import WorkerSettings
from workers.http import HttpClients, env_proxy, error_for_status, json_object, parse_retry_after, tls_context, translate_errors
from workers.registry import build_worker
from workers.types import AssembledPrompt, ChatMessage

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


def connection_key() -> Any:
    from aiohttp.client_reqrep import ConnectionKey

    return ConnectionKey("127.0.0.1", 9, False, True, None, None, None)


@pytest.mark.parametrize(("value", "expected"), [("5", 5.0), ("0.5", 0.5), (" 12 ", 12.0), ("", None), (None, None), ("soon", None)])
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_retry_after_http_date() -> None:
    assert parse_retry_after("Thu, 26 Nov 2026 12:00:30 GMT", now=NOW) == 30.0
    assert parse_retry_after("Thu, 26 Nov 2026 11:00:00 GMT", now=NOW) == 0.0  # in the past


def test_retry_after_negative_is_clamped() -> None:
    assert parse_retry_after("-3", now=NOW) is None  # not a delta-seconds value at all


@pytest.mark.parametrize(
    ("status", "klass"),
    [
        (429, WorkerRateLimited),
        (401, WorkerAuthError),
        (403, WorkerAuthError),
        (504, WorkerTimeout),
        (500, TransientWorkerError),
        (502, TransientWorkerError),
        (503, TransientWorkerError),
        (529, TransientWorkerError),
        (408, TransientWorkerError),
        (400, PermanentWorkerError),
        (404, PermanentWorkerError),
        (422, PermanentWorkerError),
    ],
)
def test_status_mapping(status: int, klass: type[OrchestratorError]) -> None:
    error = error_for_status("w", status, httpx.Headers({"retry-after": "4"}), b'{"error": {"message": "nope"}}')
    assert type(error) is klass
    assert error.data["upstream_status"] == status and error.data["upstream_message"] == "nope"


def test_retry_after_only_kept_where_it_means_something() -> None:
    assert error_for_status("w", 429, httpx.Headers({"retry-after": "4"}), b"").retry_after == 4.0
    assert error_for_status("w", 400, httpx.Headers({"retry-after": "4"}), b"").retry_after is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": "plain string"}', "plain string"),
        (b'{"message": "top level"}', "top level"),
        (b"<html>oops</html>", "<html>oops</html>"),
        (b'["a list"]', "['a list']"),
        (b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', "Overloaded"),
    ],
)
def test_provider_message_shapes(body: bytes, message: str) -> None:
    assert error_for_status("w", 500, httpx.Headers(), body).data["upstream_message"] == message


@pytest.mark.parametrize(
    ("exc", "klass"),
    [
        (httpx.ReadTimeout("t"), WorkerTimeout),
        (httpx.ConnectTimeout("t"), WorkerTimeout),
        (httpx.ConnectError("c"), WorkerConnectionError),
        (httpx.RemoteProtocolError("r"), WorkerConnectionError),
        (httpx.ReadError("r"), WorkerConnectionError),
        (aiohttp.ServerTimeoutError("read"), WorkerTimeout),
        (aiohttp.ConnectionTimeoutError("connect"), WorkerTimeout),
        (aiohttp.ClientPayloadError("Response payload is not completed"), WorkerConnectionError),
        (aiohttp.ServerDisconnectedError(), WorkerConnectionError),
        (aiohttp.ClientConnectorError(connection_key(), OSError(111, "refused")), WorkerConnectionError),
        (ValueError("v"), WorkerProtocolError),
        (KeyError("choices"), WorkerProtocolError),
        (TypeError("t"), WorkerProtocolError),
        (IndexError("i"), WorkerProtocolError),
    ],
)
def test_translate_errors(exc: Exception, klass: type[OrchestratorError]) -> None:
    with pytest.raises(klass) as info, translate_errors("w"):
        raise exc
    assert info.value.__cause__ is exc and info.value.data["worker"] == "w"


def test_translate_errors_passes_tree_errors_through() -> None:
    original = WorkerRateLimited(retry_after=1)
    with pytest.raises(WorkerRateLimited) as info, translate_errors("w"):
        raise original
    assert info.value is original


def test_translate_errors_does_not_hide_other_bugs() -> None:
    with pytest.raises(ZeroDivisionError), translate_errors("w"):
        _ = 1 / 0


def test_json_object_requires_an_object() -> None:
    assert json_object("w", '{"a": 1}') == {"a": 1}
    with pytest.raises(WorkerProtocolError):
        json_object("w", "[1, 2]")


def test_clients_carry_headers_timeouts_and_close() -> None:
    clients = HttpClients(
        WorkerSettings(name="w", kind="openai", base_url="http://127.0.0.1:9/v1/", timeout_s=3, connect_timeout_s=1, extra_headers={"X-A": "b"}),
        {"Authorization": "Bearer k"},
    )
    sync = clients.sync
    assert clients.sync is sync  # pooled: one client per worker
    assert sync.headers["authorization"] == "Bearer k" and sync.headers["x-a"] == "b"
    assert sync.timeout.read == 3 and sync.timeout.connect == 1
    assert str(sync.base_url) == "http://127.0.0.1:9/v1/"
    clients.close()
    assert clients.sync is not sync
    clients.close()


def test_clients_of_every_loop_share_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker thread's first request builds its loop's client: it must not load the
    CA certificates again (~20 ms each time, holding up the other threads)."""
    loads: list[object] = []
    real = ssl.SSLContext.load_verify_locations

    def counting(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(args or kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting)
    tls_context.cache_clear()
    settings = WorkerSettings(name="w", kind="openai", base_url="https://127.0.0.1:9/v1/")
    clients = [HttpClients(settings, {}) for _ in range(3)]

    async def one_client_per_loop(http: HttpClients) -> aiohttp.ClientSession:
        return await http.session()

    built = [asyncio.run(one_client_per_loop(http)) for http in clients for _ in range(2)]
    assert len({id(client) for client in built}) == 6 and clients[0].sync is not None
    assert len(loads) == 1  # one context for the process: sync and async, every loop, every worker
    assert tls_context().verify_mode == ssl.CERT_REQUIRED and tls_context().check_hostname  # httpx's default: verified


def test_a_loop_keeps_one_session_with_the_settings_and_closes_it_when_it_ends() -> None:
    clients = HttpClients(
        WorkerSettings(
            name="w", kind="openai", base_url="http://127.0.0.1:9/v1/", timeout_s=3, connect_timeout_s=1, max_connections=7, extra_headers={"X-A": "b"}
        ),
        {"Authorization": "Bearer k"},
    )

    async def twice() -> tuple[aiohttp.ClientSession, aiohttp.ClientSession, int]:
        first = await clients.session()
        assert first.connector is not None  # read while open: closing the session drops it
        return first, await clients.session(), first.connector.limit

    first, again, limit = asyncio.run(twice())
    assert first is again  # its connections kept from one request to the next
    assert first.headers["authorization"] == "Bearer k" and first.headers["x-a"] == "b"
    assert (first.timeout.sock_read, first.timeout.sock_connect, first.timeout.connect, first.timeout.total) == (3, 1, 4, None)
    assert limit == 7
    assert first.closed and len(clients._sessions) == 0  # closed as asyncio.run ended its loop: nothing kept for it

    loop = asyncio.new_event_loop()
    try:
        kept = loop.run_until_complete(clients.session())
        assert loop.run_until_complete(clients.session()) is kept and not kept.closed  # a thread's loop keeps its session
        loop.run_until_complete(loop.shutdown_asyncgens())
        assert kept.closed and len(clients._sessions) == 0
    finally:
        loop.close()


def test_each_thread_has_its_own_sync_client_and_close_ends_them_all() -> None:
    clients = HttpClients(WorkerSettings(name="w", kind="openai", base_url="http://127.0.0.1:9/v1/"), {})
    seen: list[httpx.Client] = []

    def grab() -> None:
        seen.extend([clients.sync, clients.sync])

    threads = [threading.Thread(target=grab) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(c) for c in seen}) == 3 and all(seen[i] is seen[i + 1] for i in range(0, 6, 2))  # one per thread, kept
    mine = clients.sync
    clients.close()
    assert all(c.is_closed for c in [*seen, mine])
    assert clients.sync is not mine and not clients.sync.is_closed  # a new one after close


def test_a_proxy_named_in_the_environment_carries_the_streams_but_not_past_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = AssembledPrompt(messages=(ChatMessage("user", "hi"),), model="m", max_tokens=5)

    async def run() -> tuple[list[bytes], type[Exception], type[Exception]]:
        seen: list[bytes] = []

        async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append((await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0])
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        monkeypatch.setenv("NO_PROXY", "localhost")
        outcomes = []
        for base_url in ("http://provider.example/v1", "http://localhost:9/v1"):  # the second is under NO_PROXY: nothing listens there
            worker = build_worker(WorkerConfig(kind="openai", base_url=base_url, models=("m",)).settings("p"))
            with pytest.raises(OrchestratorError) as info:
                async for _chunk in worker.infer_stream(prompt):
                    pass
            outcomes.append(type(info.value))
        server.close()
        return seen, outcomes[0], outcomes[1]

    seen, through_proxy, direct = asyncio.run(run())
    assert seen == [b"POST http://provider.example/v1/chat/completions HTTP/1.1"]  # once, in the proxy's absolute form
    assert through_proxy is TransientWorkerError  # the proxy's 502
    assert direct is WorkerConnectionError  # went straight to localhost:9
    assert env_proxy("https://provider.example/v1") is None  # no HTTPS_PROXY, no ALL_PROXY
