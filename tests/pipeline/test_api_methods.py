"""Methods each endpoint answers, and what the others get."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from tests.conftest import TenantFixture


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "path"),
    [("put", "/api/v1/infer"), ("delete", "/api/v1/infer"), ("put", "/api/v1/documents"), ("post", "/api/v1/status/x"), ("patch", "/api/v1/documents/x")],
)
def test_other_methods_are_405(owner: TenantFixture, method: str, path: str) -> None:
    resp = getattr(owner.client, method)(path, {}, format="json")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.django_db
def test_options_needs_a_key_too(anon: APIClient, owner: TenantFixture) -> None:
    assert anon.options("/api/v1/documents").status_code == 401
    assert owner.client.options("/api/v1/documents").status_code == 200


@pytest.mark.django_db
def test_head_follows_get(owner: TenantFixture) -> None:
    assert owner.client.head("/api/v1/documents").status_code == 200


keys = st.sampled_from(["title", "body", "metadata", "id", "tenant", "tenant_id", "created_at"])
values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=40)
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)
)


@pytest.mark.django_db
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(keys, values, max_size=6) | values)
def test_arbitrary_document_bodies_never_get_a_5xx(owner: TenantFixture, outsider: TenantFixture, body: object) -> None:
    resp = owner.client.generic("POST", "/api/v1/documents", json.dumps(body), content_type="application/json")
    assert resp.status_code in (201, 400), (body, resp.content)
    if resp.status_code == 201:
        created = resp.json()
        # Whatever tenant the body claimed, the document is the caller's.
        assert outsider.client.get(f"/api/v1/documents/{created['id']}").status_code == 404
        assert owner.client.get(f"/api/v1/documents/{created['id']}").status_code == 200
