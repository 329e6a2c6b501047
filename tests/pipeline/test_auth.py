"""API keys: shown once, stored hashed, prefixed, revocable; Bearer authentication."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from orchestrator_site.errors import ApiKeyInvalid, ApiKeyRevoked
from pipeline.auth import KEY_PREFIX, api_key_authenticate, api_key_issue, api_key_revoke, bearer_token, hash_key, tenant_create
from pipeline.models import ApiKey, Tenant
from tests.conftest import TenantFixture


@pytest.mark.django_db
def test_key_is_random_prefixed_and_only_its_hash_is_stored() -> None:
    issued = tenant_create(name="acme")
    raw, key = issued.raw, issued.api_key
    assert raw.startswith(KEY_PREFIX) and len(raw) > 40
    assert key.prefix == raw[: len(key.prefix)] and len(key.prefix) == len(KEY_PREFIX) + 8
    assert key.key_hash == hash_key(raw) and raw not in key.key_hash
    stored = ApiKey.objects.values_list("prefix", "key_hash", "name").get(pk=key.pk)
    assert raw not in "".join(stored)
    assert tenant_create(name="other").raw != raw


@pytest.mark.django_db
def test_authenticate_valid_invalid_and_revoked(owner: TenantFixture) -> None:
    assert api_key_authenticate(owner.key).tenant == owner.tenant
    with pytest.raises(ApiKeyInvalid):
        api_key_authenticate(owner.key + "x")
    with pytest.raises(ApiKeyInvalid):
        api_key_authenticate("sk-not-ours")
    api_key_revoke(api_key=owner.issued.api_key)
    with pytest.raises(ApiKeyRevoked):
        api_key_authenticate(owner.key)


@pytest.mark.django_db
def test_inactive_tenant_keys_stop_working(owner: TenantFixture) -> None:
    Tenant.objects.filter(pk=owner.tenant.pk).update(is_active=False)
    with pytest.raises(ApiKeyRevoked):
        api_key_authenticate(owner.key)


@pytest.mark.django_db
def test_revoking_twice_keeps_the_first_time(owner: TenantFixture) -> None:
    api_key_revoke(api_key=owner.issued.api_key)
    first = ApiKey.objects.get(pk=owner.issued.api_key.pk).revoked_at
    api_key_revoke(api_key=owner.issued.api_key)
    assert ApiKey.objects.get(pk=owner.issued.api_key.pk).revoked_at == first


@pytest.mark.django_db
def test_a_tenant_may_hold_several_keys(owner: TenantFixture) -> None:
    second = api_key_issue(tenant=owner.tenant, name="ci")
    assert api_key_authenticate(second.raw).tenant == api_key_authenticate(owner.key).tenant


@pytest.mark.parametrize(("header", "token"), [(b"", None), (b"Bearer abc", "abc"), (b"bearer   abc  ", "abc"), ("Bearer xyz", "xyz")])
def test_bearer_parsing(header: bytes | str, token: str | None) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("header", [b"Basic dXNlcjpwYXNz", b"Bearer", b"Bearer   ", b"Token abc"])
def test_bearer_parsing_rejects_other_schemes(header: bytes) -> None:
    with pytest.raises(ApiKeyInvalid):
        bearer_token(header)


@pytest.mark.django_db
def test_create_tenant_command_prints_a_working_key() -> None:
    out = StringIO()
    call_command("create_tenant", "acme", stdout=out)
    raw = out.getvalue().strip()
    assert api_key_authenticate(raw).tenant.name == "acme"


@pytest.mark.django_db
def test_create_tenant_twice_fails_unless_reuse() -> None:
    call_command("create_tenant", "acme", stdout=StringIO())
    with pytest.raises(CommandError, match="already exists"):
        call_command("create_tenant", "acme", stdout=StringIO())
    out = StringIO()
    call_command("create_tenant", "acme", "--reuse", "--key-name", "second", stdout=out)
    assert api_key_authenticate(out.getvalue().strip()).name == "second"
    assert Tenant.objects.filter(name="acme").count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_create_tenant_rejects_bad_names(name: str) -> None:
    with pytest.raises(CommandError):
        call_command("create_tenant", name, stdout=StringIO())


@pytest.mark.django_db
def test_admin_lists_tenants_keys_documents_and_turns(staff: Client, owner: TenantFixture) -> None:
    for path in (
        "/admin/pipeline/tenant/",
        "/admin/pipeline/apikey/",
        "/admin/pipeline/document/",
        "/admin/pipeline/sessionturn/",
        f"/admin/pipeline/tenant/{owner.tenant.pk}/change/",
    ):
        resp = staff.get(path)
        assert resp.status_code == 200, path
    page = staff.get("/admin/pipeline/apikey/").content.decode()
    assert owner.issued.api_key.prefix in page and owner.issued.api_key.key_hash not in page


@pytest.mark.django_db
def test_admin_issues_a_key_shown_once(staff: Client, owner: TenantFixture) -> None:
    resp = staff.post("/admin/pipeline/tenant/", {"action": "issue_key", "_selected_action": [str(owner.tenant.pk)]}, follow=True)
    text = resp.content.decode()
    start = text.index(KEY_PREFIX, text.index("New key for owner"))
    raw = text[start : text.index(" ", start)]
    assert api_key_authenticate(raw).tenant == owner.tenant
    assert ApiKey.objects.filter(tenant=owner.tenant).count() == 2


@pytest.mark.django_db
def test_admin_revokes_keys_and_cannot_add_them_directly(staff: Client, owner: TenantFixture) -> None:
    staff.post("/admin/pipeline/apikey/", {"action": "revoke", "_selected_action": [str(owner.issued.api_key.pk)]}, follow=True)
    with pytest.raises(ApiKeyRevoked):
        api_key_authenticate(owner.key)
    assert staff.get("/admin/pipeline/apikey/add/").status_code == 403


@pytest.mark.django_db
def test_admin_adds_documents(staff: Client, owner: TenantFixture) -> None:
    resp = staff.post("/admin/pipeline/document/add/", {"tenant": str(owner.tenant.pk), "title": "From admin", "body": "searchable body", "metadata": "{}"})
    assert resp.status_code == 302
    assert owner.tenant.documents.get().title == "From admin"
