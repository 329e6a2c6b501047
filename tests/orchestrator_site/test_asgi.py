"""The ASGI application Daphne runs: HTTP to Django, static files in development."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import threading

import httpx
import pytest
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpResponse

from orchestrator_site import asgi
from tests.conftest import ROOT, asgi_request, left_for_the_collector


def get(path: str, **headers: str) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi.application), base_url="http://testserver") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(run())


def test_http_goes_to_django_with_static_files_in_development() -> None:
    assert isinstance(asgi.http_app, ASGIStaticFilesHandler)
    assert get("/static/admin/css/base.css").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_api_errors_through_asgi() -> None:
    resp = get("/api/v1/documents")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "api_key_missing"
    assert resp.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.django_db(transaction=True)
def test_health_through_asgi() -> None:
    resp = get("/health")
    assert resp.status_code == 200 and set(resp.json()["checks"]) == {"postgres", "redis", "broker"}


def test_without_serve_static_the_app_is_plain_django() -> None:
    code = "from orchestrator_site import asgi; print(type(asgi.http_app).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "SERVE_STATIC": "0"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "DjangoByPath"


@pytest.mark.django_db(transaction=True)
def test_api_paths_skip_the_session_stack_and_keep_the_security_headers() -> None:
    resp = get("/health")
    assert resp.headers["x-content-type-options"] == "nosniff" and resp.headers["referrer-policy"] == "same-origin"
    assert "cookie" not in resp.headers.get("vary", "").lower() and "set-cookie" not in resp.headers  # no session, no CSRF cookie
    assert asgi.api_app._middleware_chain is not asgi.full_stack_app._middleware_chain


@pytest.mark.django_db(transaction=True)
def test_the_admin_keeps_sessions_and_csrf() -> None:
    login = get("/admin/login/")
    assert login.status_code == 200 and "csrftoken" in login.headers.get("set-cookie", "")
    assert login.headers["x-frame-options"] == "DENY"

    async def post_without_token() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi.application), base_url="http://testserver") as client:
            return await client.post("/admin/login/", data={"username": "x", "password": "y"})

    assert asyncio.run(post_without_token()).status_code == 403  # CSRF enforced


def test_building_a_handler_leaves_the_settings_as_they_were() -> None:
    from django.conf import settings

    before = list(settings.MIDDLEWARE)
    handler = asgi.handler_with(["orchestrator_site.middleware.access_log"])
    assert before == settings.MIDDLEWARE and handler._middleware_chain is not None


def test_html_pages_outside_the_admin_still_refuse_framing() -> None:
    for page in ("/playground", "/api/v1/docs/"):
        assert get(page).headers["x-frame-options"] == "DENY", page


def test_reimporting_the_module_is_harmless() -> None:
    reloaded = importlib.reload(asgi)
    assert callable(reloaded.application)


def test_no_thread_hop_before_the_view() -> None:
    """In the gateway process: request_started has no sync receiver left (Django would
    hop to a thread to run it), request_finished still returns the request thread's
    connection; both handlers run the security headers in line."""
    code = (
        "from django.core import signals; from orchestrator_site import asgi; "
        "sync_started, _ = signals.request_started._live_receivers(None); "
        "sync_finished, _ = signals.request_finished._live_receivers(None); "
        "names = lambda receivers: sorted(getattr(r, '__name__', repr(r)) for r in receivers); "
        "print(names(sync_started), names(sync_finished))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    started, finished = proc.stdout.strip().split("] [")
    assert started == "[" and "close_old_connections" in finished


def test_security_headers_are_djangos_run_in_line() -> None:
    from inspect import iscoroutinefunction

    from django.http import HttpResponse
    from django.test import RequestFactory, override_settings

    from orchestrator_site.middleware import security_headers

    async def view(request: object) -> HttpResponse:
        return HttpResponse("ok")

    middleware = security_headers(view)
    assert iscoroutinefunction(middleware)  # Django calls it as it is: no sync_to_async around it
    response = asyncio.run(middleware(RequestFactory().get("/health")))
    assert response["X-Content-Type-Options"] == "nosniff" and response["Referrer-Policy"] == "same-origin"
    assert response["Cross-Origin-Opener-Policy"] == "same-origin"
    with override_settings(SECURE_SSL_REDIRECT=True, SECURE_HSTS_SECONDS=60):
        redirecting = security_headers(view)
        assert asyncio.run(redirecting(RequestFactory().get("/health"))).status_code == 301  # http: to https first
        secure = asyncio.run(redirecting(RequestFactory().get("/health", secure=True)))
        assert secure.status_code == 200 and secure["Strict-Transport-Security"] == "max-age=60"
    # Async only: Django never calls it from a sync chain (it adapts the chain instead).
    assert security_headers.async_capable and not security_headers.sync_capable
    assert asgi.IN_LINE["django.middleware.security.SecurityMiddleware"] == "orchestrator_site.middleware.security_headers"


@pytest.mark.django_db(transaction=True)
def test_requests_reuse_their_sync_threads_instead_of_starting_two_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request makes a sync call (at least the response's close). With asgiref's
    own per-request context that is two thread starts per request (the executor's
    thread, and one to join it); here requests one after another reuse one thread."""
    started: list[str] = []
    original = threading.Thread.start

    def counting(self: threading.Thread) -> None:
        started.append(self.name)
        original(self)

    async def run() -> tuple[int, list[int]]:
        idle: list[int] = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi.application), base_url="http://testserver") as client:
            for n in range(20):
                if n == 1:
                    warm = len(started)  # the first request may start the loop's and a request thread
                resp = await client.get("/api/v1/documents")  # 401: the key check, then the response closed in a sync call
                assert resp.status_code == 401
                idle.append(asgi.ReusedThreadsHandler.threads.idle)
        return len(started) - warm, idle

    monkeypatch.setattr(threading.Thread, "start", counting)
    later, idle_after_each = asyncio.run(run())
    assert later == 0, started  # 19 requests, no thread started (asgiref's own context: 38)
    assert min(idle_after_each) >= 1  # each request gave its thread back


def test_a_request_thread_is_kept_idle_and_handed_out_again() -> None:
    threads = asgi.RequestThreads(keep=2)
    first = threads.take()
    assert first.submit(threading.get_ident).result() != threading.get_ident()
    threads.give_back(first)
    assert threads.idle == 1 and threads.take() is first
    ident = first.submit(threading.get_ident).result()
    assert first.submit(threading.get_ident).result() == ident  # one thread: thread-sensitive calls stay on it
    threads.give_back(first)


def test_a_busy_request_thread_is_let_go_and_so_is_one_beyond_the_bound() -> None:
    threads = asgi.RequestThreads(keep=1)
    busy, release = threads.take(), threading.Event()
    call = busy.submit(release.wait, 5)
    assert busy.busy
    threads.give_back(busy)  # its request was cancelled during a sync call: not handed to the next
    assert threads.idle == 0 and threads.take() is not busy
    release.set()
    assert call.result() is True and not busy.busy

    kept, extra = asgi.RequestThread(), asgi.RequestThread()
    threads.give_back(kept)
    threads.give_back(extra)
    assert threads.idle == 1 and threads.take() is kept
    with pytest.raises(RuntimeError):
        extra.submit(threading.get_ident)  # shut down
    kept.shutdown()


def test_the_handler_serves_http_only() -> None:
    async def call() -> None:
        await asgi.api_app({"type": "lifespan"}, None, None)

    with pytest.raises(ValueError, match="lifespan"):
        asyncio.run(call())


@pytest.mark.django_db(transaction=True)
def test_requests_at_once_each_have_a_thread_of_their_own_and_all_come_back() -> None:
    """Thread-sensitive calls of two requests never share a thread at the same time: a
    thread is handed to a request only when no request in flight has it, and every
    request gives its thread back."""
    threads = asgi.ReusedThreadsHandler.threads
    in_flight: set[asgi.RequestThread] = set()
    taken: list[asgi.RequestThread] = []
    original_take, original_give_back = threads.take, threads.give_back

    def take() -> asgi.RequestThread:
        executor = original_take()
        assert executor not in in_flight
        in_flight.add(executor)
        taken.append(executor)
        return executor

    def give_back(executor: asgi.RequestThread) -> None:
        in_flight.remove(executor)
        original_give_back(executor)

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi.application), base_url="http://testserver") as client:
            replies = await asyncio.gather(*(client.get("/api/v1/documents") for _ in range(8)))
        assert [r.status_code for r in replies] == [401] * 8

    threads.take, threads.give_back = take, give_back  # type: ignore[method-assign]
    try:
        asyncio.run(run())
    finally:
        del threads.take, threads.give_back
    assert len(taken) == 8 and not in_flight and threads.idle >= len(set(taken))


class PlainHandler(asgi.ReusedThreadsHandler):
    """The gateway's handler around a view that answers at once (no middleware): what
    is left behind is the handler's own."""

    def __init__(self) -> None:
        pass

    async def run_get_response(self, request: object) -> HttpResponse:  # type: ignore[override]
        return HttpResponse("ok")


class StockListener(PlainHandler):
    listen_for_disconnect = ASGIHandler.listen_for_disconnect  # Django's own


def garbage_per_request(handler: ASGIHandler) -> tuple[float, list[int]]:
    collected, replies = asyncio.run(left_for_the_collector(lambda _n: asgi_request(handler, "GET", "/health")))
    return collected / len(replies), [reply[0]["status"] for reply in replies]


def test_a_request_leaves_nothing_for_the_cycle_collector() -> None:
    """Django's handler ends each request's disconnect listener with ``RequestAborted``
    and re-raises it to swallow it: the traceback holds the handler's frame, the frame
    the task, the task the exception, so every request's objects wait for the cycle
    collector (the gateway's pauses of several milliseconds). The gateway's listener
    just ends. If Django's stops leaving garbage, the override can go."""
    left, statuses = garbage_per_request(PlainHandler())
    assert statuses == [200] * 10 and left == 0
    stock_left, stock_statuses = garbage_per_request(StockListener())
    assert stock_statuses == [200] * 10 and stock_left > 20


def test_a_message_other_than_a_disconnect_after_the_body_is_refused_as_django_refuses_it() -> None:
    async def run() -> None:
        await asgi_request(asgi.application, "GET", "/playground", after_body={"type": "http.request", "body": b"", "more_body": False})

    with pytest.raises(AssertionError, match=r"Invalid ASGI message after request body: http\.request"):
        asyncio.run(run())


def test_a_client_that_leaves_cancels_a_view_still_running() -> None:
    """The listener ending on a disconnect is still the signal that stops a view: the
    handler cancels the request's task (a streamed response stops being produced)."""
    started, cancelled = asyncio.Event(), []

    class SlowHandler(PlainHandler):
        async def run_get_response(self, request: object) -> None:  # type: ignore[override]
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

    async def run() -> list[dict[str, object]]:
        leave = asyncio.Event()

        async def client_leaves() -> None:
            await started.wait()
            leave.set()

        leaving = asyncio.create_task(client_leaves())
        sent = await asyncio.wait_for(asgi_request(SlowHandler(), "GET", "/health", leave=leave), 5)
        await leaving
        return sent

    assert asyncio.run(run()) == [] and cancelled == [True]
