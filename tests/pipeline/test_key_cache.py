"""The gateway's key cache: an API request whose key Postgres accepted lately costs
no query; revocations reach it at once in this process and within the TTL elsewhere."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from orchestrator_site.errors import ApiKeyInvalid, ApiKeyRevoked
from pipeline.auth import KeyCache, api_key_authenticate_cached, key_cache
from pipeline.models import ApiKey, Tenant
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    key_cache.clear()
    yield
    key_cache.clear()


def key_queries(tenant: TenantFixture, body: object, key: str | None = None) -> tuple[int, int]:
    """(status, queries on the key table) of one POST /api/v1/infer."""
    client = tenant.client
    if key is not None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    with CaptureQueriesContext(connection) as queries:
        resp = client.post("/api/v1/infer", body, format="json")
    return resp.status_code, sum("pipeline_apikey" in q["sql"] for q in queries.captured_queries)


def test_a_second_request_with_the_same_key_costs_no_query(owner: TenantFixture) -> None:
    # An empty body: authenticated, then refused by validation (400), no task sent.
    assert key_queries(owner, {}) == (400, 1)
    assert key_queries(owner, {}) == (400, 0)
    assert key_queries(owner, {}, key=owner.key + "x") == (401, 1)  # another key: asked


def test_with_no_ttl_every_request_asks_postgres(owner: TenantFixture) -> None:
    with override_settings(API_KEY_CACHE_S=0):
        assert key_queries(owner, {}) == (400, 1)
        assert key_queries(owner, {}) == (400, 1)


def test_a_refused_key_is_never_kept(owner: TenantFixture) -> None:
    for _ in range(2):
        with pytest.raises(ApiKeyInvalid), CaptureQueriesContext(connection) as queries:
            api_key_authenticate_cached(owner.key + "x")
        assert len(queries.captured_queries) == 1


def test_a_revocation_made_elsewhere_is_seen_once_the_ttl_runs_out(owner: TenantFixture) -> None:
    with override_settings(API_KEY_CACHE_S=1):
        assert key_queries(owner, {})[0] == 400
        # As another process would: straight to Postgres, nothing here is told.
        ApiKey.objects.filter(pk=owner.issued.api_key.pk).update(revoked_at=timezone.now())
        assert key_queries(owner, {}) == (400, 0)  # still trusted, within the TTL
        time.sleep(1.05)
        status, asked = key_queries(owner, {})
        assert (status, asked) == (401, 1)


def test_a_tenant_saved_in_this_process_is_not_served_from_the_cache(owner: TenantFixture) -> None:
    api_key_authenticate_cached(owner.key)
    tenant = Tenant.objects.get(pk=owner.tenant.pk)
    tenant.is_active = False
    tenant.save()  # as the admin does
    with pytest.raises(ApiKeyRevoked):
        api_key_authenticate_cached(owner.key)


def test_a_flood_of_keys_starts_the_cache_over(owner: TenantFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = KeyCache()
    monkeypatch.setattr(KeyCache, "MAX_ENTRIES", 3)
    for n in range(3):
        cache.put(f"po_{n}", owner.issued.api_key)
    assert cache.get("po_0") is not None
    cache.put("po_3", owner.issued.api_key)
    assert cache.get("po_0") is None and cache.get("po_3") is not None


def test_a_bad_scheme_is_refused_as_before(owner: TenantFixture) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Basic {owner.key}")
    resp = client.post("/api/v1/infer", {}, format="json")
    assert resp.status_code == 401 and resp.json()["error"]["message"] == "use 'Authorization: Bearer <key>'"


def test_the_openai_endpoint_uses_the_cache_too(owner: TenantFixture) -> None:
    for asked in (1, 0):
        with CaptureQueriesContext(connection) as queries:
            resp = owner.client.post("/v1/chat/completions", {}, format="json")
        assert resp.status_code == 400 and sum("pipeline_apikey" in q["sql"] for q in queries.captured_queries) == asked
