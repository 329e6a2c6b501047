"""ASGI entry point (uvicorn; Daphne works too). HTTP goes to Django; WebSocket routes join here.

Two Django handlers serve HTTP: the admin's paths (``FULL_STACK_PATHS``) go
through the whole middleware stack (sessions, CSRF, logins, messages), every
other path through the stack without ``ADMIN_ONLY_MIDDLEWARE`` (access log,
security headers, and what instrumentation added): API requests authenticate
by key and keep no session, and each skipped middleware would cost thread hops
per request. The security headers' hooks run in line (``IN_LINE``), and
``request_started`` has no sync receivers left: no thread hop comes between a
request's arrival and its view. A request's sync calls run on a thread kept from
one request to the next (``RequestThreads``), not on one started for it.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")
django.setup(set_prefix=False)  # as django.core.asgi.get_asgi_application does

from asgiref.sync import ThreadSensitiveContext  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402  (needs Django set up)
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.urls import path  # noqa: E402

from pipeline.consumers import StreamConsumer  # noqa: E402

# Middlewares the gateway runs with their hooks called in line: as MiddlewareMixin
# classes under ASGI each hook is a thread hop, on every request. The settings keep
# Django's own name (``check --deploy`` looks for it).
IN_LINE = {"django.middleware.security.SecurityMiddleware": "orchestrator_site.middleware.security_headers"}


class RequestThreads:
    """Single-thread executors for requests' thread-sensitive sync work, kept from one
    request to the next. Django runs each request in an asgiref
    ``ThreadSensitiveContext``; without an executor of its own, that context starts a
    thread for the request's first sync call (every request has one: the response's
    ``close``), and another thread on exit to join it: two thread starts per request,
    ~10 % of the gateway's CPU under SSE load. An executor is handed to one request at
    a time and comes back idle; one still busy (its request was cancelled during a
    sync call) is let go instead, and so is one beyond ``keep``."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._idle: collections.deque[RequestThread] = collections.deque()

    def take(self) -> RequestThread:
        try:
            return self._idle.pop()
        except IndexError:
            return RequestThread()

    def give_back(self, executor: RequestThread) -> None:
        if executor.busy or len(self._idle) >= self.keep:
            executor.shutdown(wait=False)  # its thread ends once its last call has
            return
        self._idle.append(executor)

    @property
    def idle(self) -> int:
        return len(self._idle)


class RequestThread(ThreadPoolExecutor):
    """One thread, and whether a call submitted to it has not finished yet."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="request")
        self._pending = 0
        self._count_lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._pending > 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._count_lock:
            self._pending += 1
        future = super().submit(fn, *args, **kwargs)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: Future[Any]) -> None:
        with self._count_lock:
            self._pending -= 1


class ReusedThreadsHandler(ASGIHandler):
    """Django's ASGI handler, each request's sync work on a thread from ``threads``."""

    threads = RequestThreads()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        executor = self.threads.take()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            self.threads.give_back(executor)

    async def listen_for_disconnect(self, receive: Any) -> None:
        """Django's, but a disconnect ends the task instead of raising
        ``RequestAborted``. The server reports one after every response, and ``handle``
        re-raised that exception to swallow it: its traceback held ``handle``'s frame,
        which held the task, which held the exception, so each request's whole object
        graph was left for the cycle collector. ``handle`` only waits for this task to
        end (and then cancels a view still running), so ending it is the same signal."""
        message = await receive()
        if message["type"] != "http.disconnect":
            raise AssertionError(f"Invalid ASGI message after request body: {message['type']}")  # as Django's own check


def handler_with(middleware: list[str]) -> ASGIHandler:
    """A Django ASGI handler built on its own middleware list (Django reads
    ``settings.MIDDLEWARE`` once, when a handler is built)."""
    saved = settings.MIDDLEWARE
    settings.MIDDLEWARE = [IN_LINE.get(m, m) for m in middleware]
    try:
        return ReusedThreadsHandler()
    finally:
        settings.MIDDLEWARE = saved


full_stack_app = handler_with(list(settings.MIDDLEWARE))
api_app = handler_with([m for m in settings.MIDDLEWARE if m not in settings.ADMIN_ONLY_MIDDLEWARE])


class DjangoByPath:
    """HTTP to the whole-stack handler for the admin's paths, to the API handler for the rest."""

    def __init__(self, full_stack: ASGIHandler, api: ASGIHandler, full_stack_paths: tuple[str, ...]) -> None:
        self.full_stack, self.api, self.full_stack_paths = full_stack, api, full_stack_paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        app = self.full_stack if str(scope.get("path", "")).startswith(self.full_stack_paths) else self.api
        await app(scope, receive, send)


django_app = DjangoByPath(full_stack_app, api_app, tuple(settings.FULL_STACK_PATHS))
http_app = ASGIStaticFilesHandler(django_app) if settings.SERVE_STATIC else django_app  # type: ignore[arg-type]
websocket_app = URLRouter([path("api/v1/stream", StreamConsumer.as_asgi())])
application = ProtocolTypeRouter({"http": http_app, "websocket": websocket_app})


def no_thread_hop_on_request_start() -> None:
    """Django sends ``request_started`` to its sync receivers through a thread hop, on
    the way to every view. Its two receivers have nothing to do here: each request's
    sync work runs on a request thread (``RequestThreads``), which holds no database
    connection when a request starts, and the event loop never holds one.
    ``request_finished`` keeps ``close_old_connections``: at every request's end, that
    request thread's connection goes back to the pool."""
    from django.core import signals
    from django.db import close_old_connections, reset_queries

    signals.request_started.disconnect(close_old_connections)
    signals.request_started.disconnect(reset_queries)


no_thread_hop_on_request_start()


def _settle() -> None:
    from django.urls import get_resolver

    from orchestrator_site import gctune
    from pipeline import services

    get_resolver().url_patterns  # noqa: B018  (imports every view now, not on the first request)
    services.intake_prepare()  # Celery's template message for real-time tasks, likewise
    gctune.settle()


_settle()
