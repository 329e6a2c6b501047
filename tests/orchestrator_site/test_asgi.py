"""The ASGI application the gateway runs: HTTP to Django (the admin's middleware
for the admin only), static files in development."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys

import httpx
import pytest
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.http import HttpResponse

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


@pytest.mark.django_db(transaction=True)
def test_api_paths_skip_the_session_stack_and_keep_the_security_headers() -> None:
    resp = get("/health")
    assert resp.headers["x-content-type-options"] == "nosniff" and resp.headers["referrer-policy"] == "same-origin"
    assert "cookie" not in resp.headers.get("vary", "").lower() and "set-cookie" not in resp.headers  # no session, no CSRF cookie


@pytest.mark.django_db(transaction=True)
def test_the_admin_keeps_sessions_and_csrf() -> None:
    login = get("/admin/login/")
    assert login.status_code == 200 and "csrftoken" in login.headers.get("set-cookie", "")
    assert login.headers["x-frame-options"] == "DENY"

    async def post_without_token() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi.application), base_url="http://testserver") as client:
            return await client.post("/admin/login/", data={"username": "x", "password": "y"})

    assert asyncio.run(post_without_token()).status_code == 403  # CSRF enforced


def test_html_pages_outside_the_admin_still_refuse_framing() -> None:
    for page in ("/playground", "/api/v1/docs/"):
        assert get(page).headers["x-frame-options"] == "DENY", page


def test_reimporting_the_module_is_harmless() -> None:
    reloaded = importlib.reload(asgi)
    assert callable(reloaded.application)


def test_the_admins_middleware_is_checked_where_it_lives(settings: object) -> None:
    """Django's admin and deploy checks look for it in MIDDLEWARE (silenced); this one
    looks in ADMIN_MIDDLEWARE, and for the middleware that runs it."""
    from orchestrator_site.middleware import check_admin_middleware

    assert check_admin_middleware() == []
    settings.ADMIN_MIDDLEWARE = [m for m in settings.ADMIN_MIDDLEWARE if "csrf" not in m]  # type: ignore[attr-defined]
    settings.MIDDLEWARE = ["orchestrator_site.middleware.access_log"]  # type: ignore[attr-defined]
    assert [(p.id, "CsrfViewMiddleware" in p.msg) for p in check_admin_middleware()] == [("orchestrator_site.E001", True), ("orchestrator_site.E002", False)]


def test_the_admin_only_middleware_passes_api_requests_by() -> None:
    from django.test import RequestFactory

    from orchestrator_site.middleware import AdminOnlyMiddleware

    seen: list[str] = []

    async def view(request: object) -> HttpResponse:
        seen.append(getattr(request, "path", ""))
        return HttpResponse("ok")

    middleware = AdminOnlyMiddleware(view)
    factory = RequestFactory()

    async def run() -> tuple[object, object, object]:
        api = await middleware(factory.get("/api/v1/documents"))
        hook = await middleware.process_view(factory.get("/api/v1/documents"), view, (), {})
        admin_hook = await middleware.process_view(factory.post("/admin/login/"), view, (), {})
        return api, hook, admin_hook

    api, hook, admin_hook = asyncio.run(run())
    assert getattr(api, "cookies", {}) == {} and seen == ["/api/v1/documents"] and hook is None
    assert getattr(admin_hook, "status_code", None) == 403  # the admin's CSRF check, run for it
