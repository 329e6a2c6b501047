"""The gateway's access log: one structured line per HTTP request, in the same
JSON (or console) format as every other line (Daphne's own access log is off);
and Django's security headers without the thread hops."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from inspect import iscoroutinefunction

import structlog
from django.http import HttpRequest, HttpResponseBase
from django.middleware.security import SecurityMiddleware
from django.utils.decorators import async_only_middleware, sync_and_async_middleware

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


@async_only_middleware
def security_headers(get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]]) -> Callable[[HttpRequest], Awaitable[HttpResponseBase]]:
    """Django's ``SecurityMiddleware`` (HSTS, nosniff, referrer policy, COOP, the
    HTTPS redirect), its two hooks called in line: as a ``MiddlewareMixin`` under
    ASGI it hops to a thread for each of them, on every request, for work that does
    no I/O. Only the ASGI gateway uses it (``asgi.IN_LINE``); WSGI keeps Django's."""
    security = SecurityMiddleware(get_response)

    async def middleware(request: HttpRequest) -> HttpResponseBase:
        redirect = security.process_request(request)
        if redirect is not None:
            return redirect
        return security.process_response(request, await get_response(request))  # type: ignore[arg-type]  # any response (the stubs say HttpResponse)

    return middleware
