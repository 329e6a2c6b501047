"""The gateway's middleware: one structured access-log line per HTTP request, in
the same JSON (or console) format as every other line (the server's own access
log is off); and the admin's middleware kept to the admin's paths."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from inspect import iscoroutinefunction
from typing import Any

import structlog
from asgiref.sync import markcoroutinefunction, sync_to_async
from django.core import checks
from django.http import HttpRequest, HttpResponseBase
from django.utils.decorators import sync_and_async_middleware
from django.utils.module_loading import import_string

LOGGER = "orchestrator_site.access"
log = structlog.get_logger(LOGGER)
_stdlib = logging.getLogger(LOGGER)


def _record(request: HttpRequest, response: HttpResponseBase, started_ns: int) -> None:
    if not _stdlib.isEnabledFor(logging.INFO):
        return  # the line would be dropped: skip building it
    # The path only: a query string may carry anything, and is not logged.
    log.info(
        "http_request",
        method=request.method,
        path=request.path,
        status=response.status_code,
        duration_us=(time.perf_counter_ns() - started_ns) // 1000,
        outcome="ok" if response.status_code < 500 else "error",
    )


@sync_and_async_middleware
def access_log(get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]) -> Callable[[HttpRequest], object]:
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            started = time.perf_counter_ns()
            response = await get_response(request)
            _record(request, response, started)
            return response

        return async_middleware

    def middleware(request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter_ns()
        response = get_response(request)
        _record(request, response, started)  # type: ignore[arg-type]
        return response  # type: ignore[return-value]

    return middleware


class AdminOnlyMiddleware:
    """The middleware only the admin needs (sessions, CSRF, logins, messages,
    clickjacking: ``settings.ADMIN_MIDDLEWARE``), run for the admin's paths only.

    Everything else the gateway serves authenticates by API key and keeps no
    session. Under ASGI each of those middlewares costs a thread hop per hook, on
    every request (BENCHMARKS.md); here an API request passes them by. They are
    built and called through Django's documented middleware interface: a chain of
    ``get_response`` callables, and their ``process_view`` hooks (the CSRF check),
    which Django calls on this middleware's."""

    sync_capable = False
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]]) -> None:
        from django.conf import settings

        self.get_response = get_response
        self.paths = tuple(settings.ADMIN_PATHS)
        chain: Any = get_response
        self.view_hooks: list[Callable[..., Any]] = []
        for dotted in reversed(settings.ADMIN_MIDDLEWARE):
            middleware = import_string(dotted)(chain)
            if hasattr(middleware, "process_view"):
                self.view_hooks.insert(0, middleware.process_view)
            chain = middleware
        self.admin = chain
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.path.startswith(self.paths):
            return await self.admin(request)
        return await self.get_response(request)

    async def process_view(self, request: HttpRequest, view: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> HttpResponseBase | None:
        if not request.path.startswith(self.paths):
            return None
        for hook in self.view_hooks:
            response = await sync_to_async(hook)(request, view, args, kwargs)
            if response is not None:
                return response
        return None


# Django's admin and deploy checks look for these middlewares in MIDDLEWARE; here they
# live in ADMIN_MIDDLEWARE (settings silences those checks), and this check stands in.
ADMIN_NEEDS = {
    "django.contrib.sessions.middleware.SessionMiddleware": "admin.E410",
    "django.contrib.auth.middleware.AuthenticationMiddleware": "admin.E408",
    "django.contrib.messages.middleware.MessageMiddleware": "admin.E409",
    "django.middleware.csrf.CsrfViewMiddleware": "security.W003",
    "django.middleware.clickjacking.XFrameOptionsMiddleware": "security.W002",
}


def check_admin_middleware(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    """The admin's middleware, all of it, in ADMIN_MIDDLEWARE, and that run for the admin."""
    from django.conf import settings

    problems: list[checks.CheckMessage] = [
        checks.Error(f"{path!r} must be in ADMIN_MIDDLEWARE for the admin (it stands for Django's {check})", id="orchestrator_site.E001")
        for path, check in ADMIN_NEEDS.items()
        if path not in settings.ADMIN_MIDDLEWARE
    ]
    if "orchestrator_site.middleware.AdminOnlyMiddleware" not in settings.MIDDLEWARE:
        problems.append(checks.Error("MIDDLEWARE must include orchestrator_site.middleware.AdminOnlyMiddleware", id="orchestrator_site.E002"))
    return problems


# --- HTTP metrics ---------------------------------------------------------------------------
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "TRACE", "OPTIONS", "CONNECT", "PATCH"})


def _view_name(request: HttpRequest) -> str:
    match = getattr(request, "resolver_match", None)
    return (match.view_name if match is not None else None) or "<unnamed view>"


def _observe(metrics: Any, request: HttpRequest, response: HttpResponseBase, started: float) -> None:
    """django-prometheus's HTTP metrics for one request: by method, by view, by status,
    and the latency by view (its ``Before``/``After`` middlewares' names and labels)."""
    elapsed = time.perf_counter() - started
    method = request.method if request.method in _METHODS else "<invalid method>"
    view = _view_name(request)
    status = str(response.status_code)
    metrics.requests_total.inc()
    metrics.responses_total.inc()
    metrics.requests_by_method.labels(method=method).inc()
    metrics.requests_by_transport.labels(transport="https" if request.is_secure() else "http").inc()
    metrics.requests_by_view_transport_method.labels(view=view, transport="https" if request.is_secure() else "http", method=method).inc()
    metrics.responses_by_status.labels(status=status).inc()
    metrics.responses_by_status_view_method.labels(status=status, view=view, method=method).inc()
    metrics.requests_latency_before.observe(elapsed)
    metrics.requests_latency_by_view_method.labels(view=view, method=method).observe(elapsed)
    if getattr(response, "streaming", False):
        metrics.responses_streaming.inc()


@sync_and_async_middleware
def http_metrics(get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]) -> Callable[[HttpRequest], object]:
    """The HTTP metrics django-prometheus exports, under its names (its ``Metrics``), from
    one native async middleware. Its own two middlewares are ``MiddlewareMixin``s: under
    ASGI each hook is a hop to a thread, four per request, which a side-by-side run
    measured at more than the 0.5 ms a request may pay for its metrics (BENCHMARKS.md,
    "HTTP metrics"). A streamed response is counted when its headers are ready."""
    from django_prometheus.middleware import Metrics

    metrics = Metrics.get_instance()
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            started = time.perf_counter()
            response = await get_response(request)
            _observe(metrics, request, response, started)
            return response

        return async_middleware

    def middleware(request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        response = get_response(request)
        _observe(metrics, request, response, started)  # type: ignore[arg-type]
        return response  # type: ignore[return-value]

    return middleware
