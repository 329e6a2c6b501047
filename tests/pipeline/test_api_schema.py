"""The OpenAPI schema and an offline docs page."""

from __future__ import annotations

import re

import pytest
from django.test import Client


@pytest.mark.django_db
def test_schema_lists_every_endpoint_with_bearer_auth() -> None:
    resp = Client().get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert resp.status_code == 200
    schema = resp.json()
    assert set(schema["paths"]) >= {
        "/api/v1/infer",
        "/api/v1/status/{request_id}",
        "/api/v1/result/{request_id}",
        "/api/v1/documents",
        "/api/v1/documents/{document_id}",
    }
    assert schema["components"]["securitySchemes"]["TenantApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A tenant API key: `Authorization: Bearer po_…`",
    }
    infer = schema["paths"]["/api/v1/infer"]["post"]
    assert set(infer["responses"]) >= {"200", "202", "400", "401", "413", "415"}
    assert "prompt" in schema["components"]["schemas"]["InferInput"]["required"]


@pytest.mark.django_db
def test_docs_page_loads_only_local_assets() -> None:
    client = Client()
    page = client.get("/api/v1/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/") for a in assets), assets  # nothing from a CDN
    js = next(a for a in assets if a.endswith("swagger-ui-bundle.js"))
    assert js.startswith("/static/")


def test_the_gateway_serves_the_docs_assets_itself() -> None:
    # Through the real ASGI application (what Daphne runs), static handler included.
    import asyncio

    import httpx

    from orchestrator_site.asgi import application

    async def fetch() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://testserver") as client:
            return await client.get("/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js")

    resp = asyncio.run(fetch())
    assert resp.status_code == 200 and len(resp.content) > 100_000
