"""The WSGI entry point (for operators who front Django with gunicorn for admin traffic)."""

from __future__ import annotations

import io
import json

import pytest

from orchestrator_site.wsgi import application


def call(path: str, method: str = "GET") -> tuple[str, dict[str, str], bytes]:
    captured: dict[str, object] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
        captured["status"], captured["headers"] = status, dict(headers)

    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
        "HTTP_HOST": "testserver",
    }
    body = b"".join(application(environ, start_response))
    return str(captured["status"]), captured["headers"], body  # type: ignore[return-value]


@pytest.mark.django_db(transaction=True)
def test_health_over_wsgi() -> None:
    status, headers, body = call("/health")
    assert status.startswith("200") and headers["Content-Type"] == "application/json"
    assert json.loads(body)["status"] == "ok"


def test_api_404_over_wsgi() -> None:
    status, _, body = call("/api/v1/missing")
    assert status.startswith("404") and json.loads(body)["error"]["code"] == "not_found"


def test_the_app_config_loads_the_celery_app() -> None:
    from django.apps import apps

    config = apps.get_app_config("orchestrator_site")
    config.ready()  # idempotent
    import sys

    assert "orchestrator_site.celery" in sys.modules and config.verbose_name == "prompt-orchestrator"
