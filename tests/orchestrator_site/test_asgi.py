"""The ASGI application Daphne runs: HTTP to Django, static files in development."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys

import httpx
import pytest
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

from orchestrator_site import asgi
from tests.conftest import ROOT


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
    assert proc.stdout.strip() == "ASGIHandler"


def test_reimporting_the_module_is_harmless() -> None:
    reloaded = importlib.reload(asgi)
    assert callable(reloaded.application)
