"""ASGI entry point (uvicorn; Daphne works too): HTTP goes to Django, the WebSocket
API to its Channels consumer."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")
django_app = get_asgi_application()  # sets Django up: before anything imports models

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402  (needs Django set up)
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.urls import path  # noqa: E402

from batches.consumers import BatchStreamConsumer  # noqa: E402  (the pipeline's consumer, with batch_follow)

http_app = ASGIStaticFilesHandler(django_app) if settings.SERVE_STATIC else django_app
websocket_app = URLRouter([path("api/v1/stream", BatchStreamConsumer.as_asgi())])
application = ProtocolTypeRouter({"http": http_app, "websocket": websocket_app})


def _settle() -> None:
    from django.urls import get_resolver

    from orchestrator_site import gctune
    from pipeline.config.reload import config_start

    config_start("gateway")  # the active config version, followed from now on
    get_resolver().url_patterns  # noqa: B018  (imports every view now, not on the first request)
    gctune.settle()


_settle()
