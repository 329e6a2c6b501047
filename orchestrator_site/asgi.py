"""ASGI entry point (uvicorn; Daphne works too). HTTP goes to Django; WebSocket routes join here.

Two Django handlers serve HTTP: the admin's paths (``FULL_STACK_PATHS``) go
through the whole middleware stack (sessions, CSRF, logins, messages), every
other path through the stack without ``ADMIN_ONLY_MIDDLEWARE`` (access log,
security headers, and what instrumentation added): API requests authenticate
by key and keep no session, and each skipped middleware would cost thread hops
per request. The security headers' hooks run in line (``IN_LINE``), and
``request_started`` has no sync receivers left: no thread hop comes between a
request's arrival and its view.
"""

from __future__ import annotations

import os
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")
django.setup(set_prefix=False)  # as django.core.asgi.get_asgi_application does

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


def handler_with(middleware: list[str]) -> ASGIHandler:
    """A Django ASGI handler built on its own middleware list (Django reads
    ``settings.MIDDLEWARE`` once, when a handler is built)."""
    saved = settings.MIDDLEWARE
    settings.MIDDLEWARE = [IN_LINE.get(m, m) for m in middleware]
    try:
        return ASGIHandler()
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
    sync work runs in a thread made for that request (asgiref's per-request context),
    which holds no database connection yet, and the event loop never holds one.
    ``request_finished`` keeps ``close_old_connections``: that request thread's
    connection goes back to the pool."""
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
