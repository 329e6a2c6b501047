"""Authentication edges: the principal, the challenge header, keys in odd places."""

from __future__ import annotations

import pytest
from rest_framework.test import APIRequestFactory

from orchestrator_site.errors import ApiKeyMissing
from pipeline.api.serializers import DocumentInput, validated
from pipeline.api.views import tenant_of
from pipeline.auth import ApiKeyAuthentication, IsTenant, TenantPrincipal
from tests.conftest import TenantFixture


@pytest.mark.django_db
def test_principal_exposes_the_tenant(owner: TenantFixture) -> None:
    principal = TenantPrincipal(tenant=owner.tenant, api_key=owner.issued.api_key)
    assert principal.is_authenticated and principal.tenant_id == str(owner.tenant.id)


@pytest.mark.django_db
def test_authentication_returns_principal_and_key(owner: TenantFixture) -> None:
    request = APIRequestFactory().get("/", HTTP_AUTHORIZATION=f"Bearer {owner.key}")
    principal, key = ApiKeyAuthentication().authenticate(request)  # type: ignore[misc]
    assert principal.tenant == owner.tenant and key == owner.issued.api_key


def test_no_header_means_no_attempt() -> None:
    assert ApiKeyAuthentication().authenticate(APIRequestFactory().get("/")) is None  # type: ignore[arg-type]
    assert ApiKeyAuthentication().authenticate_header(APIRequestFactory().get("/")) == 'Bearer realm="api"'  # type: ignore[arg-type]


def test_permission_requires_a_tenant_principal() -> None:
    class Anon:
        user = None

    with pytest.raises(ApiKeyMissing):
        IsTenant().has_permission(Anon(), None)  # type: ignore[arg-type]
    with pytest.raises(ApiKeyMissing):
        tenant_of(Anon())  # type: ignore[arg-type]


@pytest.mark.django_db
def test_key_in_a_query_string_is_not_accepted(owner: TenantFixture, anon: object) -> None:
    resp = anon.get(f"/api/v1/documents?api_key={owner.key}")  # type: ignore[attr-defined]
    assert resp.status_code == 401  # keys in URLs end up in access logs


@pytest.mark.django_db
def test_lowercase_scheme_and_padding_are_accepted(owner: TenantFixture, anon: object) -> None:
    anon.credentials(HTTP_AUTHORIZATION=f"bearer   {owner.key}  ")  # type: ignore[attr-defined]
    assert anon.get("/api/v1/documents").status_code == 200  # type: ignore[attr-defined]


def test_validated_returns_plain_data_or_the_mapped_error() -> None:
    assert validated(DocumentInput, {"title": "t", "body": "b"}) == {"title": "t", "body": "b"}
    with pytest.raises(Exception) as info:
        validated(DocumentInput, {"title": "t"})
    assert getattr(info.value, "code", None) == "invalid_request"
