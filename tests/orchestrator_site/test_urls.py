from __future__ import annotations

from django.test import Client, RequestFactory

from pipeline.api.errors import server_error_view


def test_unknown_path_is_a_json_404() -> None:
    resp = Client().get("/api/v1/nope")
    assert resp.status_code == 404
    assert resp.json() == {"error": {"code": "not_found", "message": "no such endpoint", "data": {}}}


def test_server_error_view_renders_internal_error() -> None:
    resp = server_error_view(RequestFactory().get("/x"))
    assert resp.status_code == 500
    assert b'"code": "internal_error"' in resp.content


def test_wsgi_and_asgi_entry_points_load() -> None:
    from orchestrator_site.asgi import application as asgi_app
    from orchestrator_site.wsgi import application as wsgi_app

    assert callable(asgi_app) and callable(wsgi_app)
