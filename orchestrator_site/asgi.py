"""ASGI entry point (Daphne). HTTP goes to Django; WebSocket routes join here."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402  (needs Django set up)
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.urls import path  # noqa: E402

from pipeline.consumers import StreamConsumer  # noqa: E402

http_app = ASGIStaticFilesHandler(django_asgi_app) if settings.SERVE_STATIC else django_asgi_app
websocket_app = URLRouter([path("api/v1/stream", StreamConsumer.as_asgi())])
application = ProtocolTypeRouter({"http": http_app, "websocket": websocket_app})
